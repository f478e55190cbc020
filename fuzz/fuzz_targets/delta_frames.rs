//! Frames between the planes as read off the control socket: `u32` length + rkyv
//! archive, split with a small frame bound, each body validated as a delta frame, an
//! ack and a store snapshot chunk.
//!
//! Asserts: the splitter never reads past its bound or the bytes given; a body that
//! validates as a delta frame (or chunk) deserializes, and its re-encoding validates and
//! deserializes to the same value (round trip); each validated entry's key and counters
//! come back from `entry_parts`; an ack round-trips too.
#![no_main]

use clickgate_proto::frames::{
    access_ack, access_delta, access_store_chunk, encode_ack, encode_delta, encode_store_chunk,
    entry_parts, split_frame, DeltaFrame, StoreChunk, FRAME_BYTES_MAX,
};
use libfuzzer_sys::fuzz_target;
use rkyv::rancor;

/// A small bound, so a length prefix cannot make the reader hold much.
const MAX: u32 = 1 << 16;

fn body_of(framed: &[u8]) -> rkyv::util::AlignedVec {
    // An archive shaped by hand may share bytes the canonical encoding repeats: allow the
    // default bound here.
    let (body, used) = split_frame(framed, FRAME_BYTES_MAX)
        .expect("own encoding within the bound")
        .expect("whole");
    assert_eq!(used, framed.len());
    body
}

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    let mut frames = 0;
    while let Ok(Some((body, used))) = split_frame(buf, MAX) {
        assert!(used >= 4 && used <= buf.len() && used <= MAX as usize + 4);
        assert_eq!(body.len(), used - 4);
        buf = &buf[used..];
        frames += 1;
        if frames > 64 {
            break;
        }

        if let Ok(f) = access_delta(&body) {
            for e in f.entries.iter() {
                entry_parts(e).expect("validated entries stay valid");
            }
            let owned: DeltaFrame =
                rkyv::deserialize::<DeltaFrame, rancor::Error>(f).expect("deserialize");
            let mut again = Vec::new();
            encode_delta(&owned, &mut again).expect("re-encode");
            let body2 = body_of(&again);
            let f2 = access_delta(&body2).expect("re-encoded frame validates");
            let owned2: DeltaFrame = rkyv::deserialize::<DeltaFrame, rancor::Error>(f2).unwrap();
            assert_eq!(owned, owned2);
        }
        if let Ok(a) = access_ack(&body) {
            let mut again = Vec::new();
            encode_ack(&a, &mut again).expect("re-encode");
            assert_eq!(access_ack(&body_of(&again)).expect("ack validates"), a);
        }
        if let Ok(c) = access_store_chunk(&body) {
            let owned: StoreChunk =
                rkyv::deserialize::<StoreChunk, rancor::Error>(c).expect("deserialize");
            let mut again = Vec::new();
            encode_store_chunk(&owned, &mut again).expect("re-encode");
            let body2 = body_of(&again);
            let c2 = access_store_chunk(&body2).expect("re-encoded chunk validates");
            let owned2: StoreChunk = rkyv::deserialize::<StoreChunk, rancor::Error>(c2).unwrap();
            assert_eq!(owned, owned2);
        }
    }
});
