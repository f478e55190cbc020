//! The controlplane store's durable files: the WAL (delta frame records) and the
//! snapshot (store chunk records), loaded into a store.
//!
//! Input: a control byte, then records of `u16` length + body that the target frames
//! with valid CRCs (`proto::framing`, as the store writes them); a length past the end
//! makes the rest a torn tail. With bit 0 set the first record is written as the
//! snapshot (a store chunk body), the rest as the WAL.
//!
//! Asserts: loading returns a store or an error, never panics; `Durable::open` cuts the
//! WAL to exactly its valid prefix; the read-only load and `open` build the same store;
//! a snapshot of that store loads back into an equal store.
#![no_main]

use std::path::Path;

use clickgate_controlplane::durable::Durable;
use clickgate_controlplane::store::{Retention, Store};
use clickgate_proto::frames::StoreChunk;
use clickgate_proto::framing::{self, Crc};
use libfuzzer_sys::fuzz_target;

const NOW_MS: u64 = 1_764_201_600_000;
/// A small cell bound, so no input makes the store large.
const CELLS_MAX: usize = 2048;

fn store() -> Store {
    Store::new(Retention::default(), CELLS_MAX)
}

/// The store's content in a canonical order (its chunks list hash maps' order).
fn canonical(s: &Store) -> Vec<StoreChunk> {
    let mut chunks = s.to_chunks();
    for c in &mut chunks {
        c.applied
            .sort_unstable_by_key(|m| (m.box_id, m.instance_id, m.core));
        c.entries.sort_unstable_by(|a, b| {
            (
                a.window,
                a.bucket_start,
                a.campaign_id,
                a.dim_kind,
                a.dim_value,
            )
                .cmp(&(
                    b.window,
                    b.bucket_start,
                    b.campaign_id,
                    b.dim_kind,
                    b.dim_value,
                ))
        });
    }
    chunks
}

fn tmp_root() -> &'static Path {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        Path::new("/tmp")
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, mut rest)) = data.split_first() else {
        return;
    };
    let mut bodies: Vec<&[u8]> = Vec::new();
    let mut tail: &[u8] = &[];
    while rest.len() >= 2 {
        let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        if n > rest.len() - 2 {
            tail = rest;
            break;
        }
        bodies.push(&rest[2..2 + n]);
        rest = &rest[2 + n..];
    }
    let mut snapshot = None;
    if ctl & 1 != 0 && !bodies.is_empty() {
        let mut s = b"CGSNAP01".to_vec();
        framing::encode(Crc::Body, bodies.remove(0), &mut s);
        snapshot = Some(s);
    }
    let mut wal = Vec::new();
    for b in &bodies {
        framing::encode(Crc::Body, b, &mut wal);
    }
    wal.extend_from_slice(tail);
    let valid = framing::split(Crc::Body, &wal).1;

    let dir = tempfile::tempdir_in(tmp_root()).expect("temp dir");
    let store_dir = dir.path().join("store");
    std::fs::create_dir(&store_dir).expect("mkdir");
    if let Some(s) = &snapshot {
        std::fs::write(store_dir.join("snapshot"), s).expect("write");
    }
    std::fs::write(store_dir.join("wal"), &wal).expect("write");

    let mut read_only = store();
    let ro = Durable::load_read_only(&store_dir, &mut read_only, NOW_MS);
    let mut opened = store();
    let Ok((mut durable, rec)) = Durable::open(&store_dir, &mut opened, NOW_MS) else {
        return;
    };
    assert!(ro.is_ok(), "open succeeded where the read-only load failed");
    let wal_len = std::fs::metadata(store_dir.join("wal")).expect("wal").len();
    assert_eq!(wal_len, valid as u64, "the WAL is cut to its valid prefix");
    assert_eq!(rec.wal_torn_bytes, (wal.len() - valid) as u64);
    assert_eq!(durable.wal_bytes(), valid as u64);
    assert!(opened.cells() <= CELLS_MAX);
    let content = canonical(&opened);
    assert_eq!(canonical(&read_only), content);

    // A snapshot of it loads back into the same store.
    durable.snapshot(&opened).expect("snapshot");
    drop(durable);
    let mut again = store();
    let (_, rec2) = Durable::open(&store_dir, &mut again, NOW_MS).expect("reopen a snapshot");
    assert_eq!(rec2.wal_frames, 0);
    assert_eq!(canonical(&again), content, "snapshot round trip");
});
