//! Frames between the planes: per-core aggregate deltas (dataplane → controlplane), acks
//! (controlplane → dataplane), and the controlplane store's snapshot chunks.
//!
//! Encoding: rkyv 0.8 archives, each framed as `u32` little-endian length + archive bytes,
//! with the length bounded by the reader ([`FRAME_BYTES_MAX`] by default). Decoding never
//! trusts the bytes: the archive is validated with bytecheck (`rkyv::access`) and the
//! fields that carry meaning (window, dimension, sketch) are checked again by
//! [`entry_parts`]. A bad frame is an error, never a panic.
//!
//! Idempotency: `(box_id, instance_id, core, delta_id)` names a delta. `delta_id` grows
//! by at least one per frame of a core within one dataplane process (`instance_id`), so
//! the controlplane applies a frame only if its `delta_id` is above the last one it applied
//! for that `(box_id, instance_id, core)`.
//!
//! Ownership: a delta frame carries `(campaign_id, advertiser_id)` for the campaigns its
//! entries count ([`CampaignOwner`], at most [`FRAME_ENTRIES_MAX`] per frame), taken
//! from the events themselves; the store keeps the map (and its snapshot chunks carry it)
//! so the query API can show each advertiser only its own campaigns. Version 2 added it.
//!
//! Entry semantics: an entry counts toward its own window and every coarser one (the
//! dataplane sends 5m entries; the store adds them to 1h and 1d too). Snapshot chunks
//! ([`StoreChunk`]) are exact: each entry counts toward its own window only.

use clickgate_core::agg::{Counters, Delta, Dim, Key};
use clickgate_core::hll::{Hll, HllError};
use clickgate_core::window::Window;
use rkyv::rancor;
use rkyv::util::AlignedVec;

/// Wire format version inside every frame.
pub const FRAMES_VERSION: u32 = 2;
/// Largest frame (length prefix excluded) a reader accepts by default.
pub const FRAME_BYTES_MAX: u32 = 64 << 20;
/// Entries per delta frame, at most: a sender splits a larger delta into several frames.
/// Worst case (every sketch dense) stays under the frame bound.
pub const FRAME_ENTRIES_MAX: usize = 4096;
const ENTRY_BYTES_MAX: usize = clickgate_core::hll::WIRE_BYTES_MAX + 128;
/// Bytes of one archived [`CampaignOwner`].
const OWNER_BYTES: usize = 16;
const _: () =
    assert!(FRAME_ENTRIES_MAX * (ENTRY_BYTES_MAX + OWNER_BYTES) + 4096 <= FRAME_BYTES_MAX as usize);

/// The advertiser a campaign's events name (docs/schema.md `advertiser_id`).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CampaignOwner {
    pub campaign_id: u64,
    pub advertiser_id: u64,
}

/// One key's counts, as shipped.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeltaEntry {
    pub campaign_id: u64,
    /// `Window as u8`.
    pub window: u8,
    pub bucket_start: u64,
    /// `Dim::to_parts`.
    pub dim_kind: u8,
    pub dim_value: u64,
    pub clicks: u64,
    pub cost_micros: u64,
    pub fraud_clicks: u64,
    /// `Hll::to_bytes` (empty: no billable user).
    pub users: Vec<u8>,
}

/// A core's delta since its previous frame.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeltaFrame {
    pub version: u32,
    /// Stable id of the dataplane box.
    pub box_id: u64,
    /// Id of one dataplane process run: delta ids restart with it.
    pub instance_id: u64,
    pub core: u32,
    /// Monotonic per (box_id, instance_id, core).
    pub delta_id: u64,
    /// The core's log LSN this delta covers up to.
    pub log_lsn: u64,
    /// The core's log LSN when this process run opened its log: everything before it was
    /// counted by earlier runs, or is a gap left by a crash that the controlplane refills
    /// from the log (0: unknown, never refilled).
    pub start_lsn: u64,
    pub entries: Vec<DeltaEntry>,
    /// Owners of the campaigns counted (at most [`FRAME_ENTRIES_MAX`]); a later frame's
    /// owner of a campaign replaces an earlier one's.
    pub owners: Vec<CampaignOwner>,
}

/// The controlplane made `delta_id` (and everything before it) of `core` durable.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub core: u32,
    pub delta_id: u64,
}

/// The last delta applied from one dataplane core, as kept in a snapshot.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedMark {
    pub box_id: u64,
    pub instance_id: u64,
    pub core: u32,
    pub delta_id: u64,
    pub log_lsn: u64,
    /// Wall-clock ms when it was last seen; lets the store forget old dataplane runs.
    pub seen_ms: u64,
}

/// A piece of a controlplane store snapshot. Entries are exact (no roll-up).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StoreChunk {
    pub version: u32,
    pub applied: Vec<AppliedMark>,
    pub entries: Vec<DeltaEntry>,
    /// Campaign owners (at most [`FRAME_ENTRIES_MAX`] per chunk).
    pub owners: Vec<CampaignOwner>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {0} bytes is over the {1}-byte bound")]
    TooLarge(u64, u32),
    #[error("frame does not validate: {0}")]
    Invalid(String),
    #[error("unknown frames version {0}")]
    Version(u32),
    #[error("{0} campaign owners in one frame, over the {FRAME_ENTRIES_MAX} bound")]
    TooManyOwners(usize),
    #[error("unknown window code {0}")]
    Window(u8),
    #[error("bad dimension kind {0} value {1}")]
    Dim(u8, u64),
    #[error("bad users sketch: {0}")]
    Sketch(#[from] HllError),
    #[error("rkyv: {0}")]
    Encode(String),
}

impl DeltaEntry {
    pub fn from_parts(key: &Key, c: &Counters, users: &Hll) -> DeltaEntry {
        let (dim_kind, dim_value) = key.dim.to_parts();
        DeltaEntry {
            campaign_id: key.campaign_id,
            window: key.window.as_u8(),
            bucket_start: key.bucket_start,
            dim_kind,
            dim_value,
            clicks: c.clicks,
            cost_micros: c.cost_micros,
            fraud_clicks: c.fraud_clicks,
            users: users.to_bytes(),
        }
    }
}

/// Splits a drained delta into frames of at most [`FRAME_ENTRIES_MAX`] entries, numbered
/// from `first_delta_id` up. An empty delta gives one empty frame (it still carries the
/// log LSN). Campaign owners ride along, at most [`FRAME_ENTRIES_MAX`] per frame (a delta
/// has at most one per `all` entry, so they fit). Returns the frames; the next free id is
/// `first_delta_id + frames.len()`.
pub fn frames_from_delta(
    box_id: u64,
    instance_id: u64,
    core: u32,
    first_delta_id: u64,
    delta: &Delta,
) -> Vec<DeltaFrame> {
    let mut out = Vec::new();
    let mut owners = delta.owners.chunks(FRAME_ENTRIES_MAX).map(|c| {
        c.iter()
            .map(|&(campaign_id, advertiser_id)| CampaignOwner {
                campaign_id,
                advertiser_id,
            })
            .collect::<Vec<_>>()
    });
    let mut chunks = delta.entries.chunks(FRAME_ENTRIES_MAX).peekable();
    if chunks.peek().is_none() {
        out.push(DeltaFrame {
            version: FRAMES_VERSION,
            box_id,
            instance_id,
            core,
            delta_id: first_delta_id,
            log_lsn: delta.log_lsn,
            start_lsn: 0,
            entries: Vec::new(),
            owners: owners.next().unwrap_or_default(),
        });
    }
    for (i, chunk) in chunks.enumerate() {
        out.push(DeltaFrame {
            version: FRAMES_VERSION,
            box_id,
            instance_id,
            core,
            delta_id: first_delta_id + i as u64,
            log_lsn: delta.log_lsn,
            start_lsn: 0,
            entries: chunk
                .iter()
                .map(|e| DeltaEntry::from_parts(&e.key, &e.counters, &e.users))
                .collect(),
            owners: owners.next().unwrap_or_default(),
        });
    }
    // More owners than entry chunks cannot come from an `Aggregator`; keep them anyway.
    for rest in owners {
        let last = out.last().expect("at least one frame");
        out.push(DeltaFrame {
            version: FRAMES_VERSION,
            box_id,
            instance_id,
            core,
            delta_id: last.delta_id + 1,
            log_lsn: delta.log_lsn,
            start_lsn: 0,
            entries: Vec::new(),
            owners: rest,
        });
    }
    out
}

fn to_archive<T>(value: &T) -> Result<AlignedVec, FrameError>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    rkyv::to_bytes::<rancor::Error>(value).map_err(|e| FrameError::Encode(e.to_string()))
}

fn put_framed(archive: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = u32::try_from(archive.len())
        .ok()
        .filter(|&l| l <= FRAME_BYTES_MAX)
        .ok_or(FrameError::TooLarge(archive.len() as u64, FRAME_BYTES_MAX))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(archive);
    Ok(())
}

/// Appends `u32` length + archive of a delta frame to `out`.
pub fn encode_delta(frame: &DeltaFrame, out: &mut Vec<u8>) -> Result<(), FrameError> {
    put_framed(&to_archive(frame)?, out)
}

/// Appends `u32` length + archive of an ack to `out`.
pub fn encode_ack(ack: &Ack, out: &mut Vec<u8>) -> Result<(), FrameError> {
    put_framed(&to_archive(ack)?, out)
}

/// Appends `u32` length + archive of a snapshot chunk to `out`.
pub fn encode_store_chunk(chunk: &StoreChunk, out: &mut Vec<u8>) -> Result<(), FrameError> {
    put_framed(&to_archive(chunk)?, out)
}

/// Reads a length prefix; errors past `max`.
pub fn frame_len(prefix: [u8; 4], max: u32) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix);
    if len > max {
        return Err(FrameError::TooLarge(len as u64, max));
    }
    Ok(len as usize)
}

/// Copies a frame body into an aligned buffer (rkyv archives need their alignment).
pub fn aligned(body: &[u8]) -> AlignedVec {
    let mut v = AlignedVec::with_capacity(body.len());
    v.extend_from_slice(body);
    v
}

/// Splits the first complete frame off `buf`: `Ok(None)` if more bytes are needed, else
/// the body (aligned copy) and the bytes consumed.
pub fn split_frame(buf: &[u8], max: u32) -> Result<Option<(AlignedVec, usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = frame_len(buf[..4].try_into().expect("4 bytes"), max)?;
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((aligned(&buf[4..4 + len]), 4 + len)))
}

/// Validates a delta frame body (aligned) and its entries; borrows the archive.
pub fn access_delta(body: &[u8]) -> Result<&ArchivedDeltaFrame, FrameError> {
    let f = rkyv::access::<ArchivedDeltaFrame, rancor::Error>(body)
        .map_err(|e| FrameError::Invalid(e.to_string()))?;
    if f.version.to_native() != FRAMES_VERSION {
        return Err(FrameError::Version(f.version.to_native()));
    }
    if f.owners.len() > FRAME_ENTRIES_MAX {
        return Err(FrameError::TooManyOwners(f.owners.len()));
    }
    for e in f.entries.iter() {
        entry_parts(e)?;
    }
    Ok(f)
}

/// Validates an ack body (aligned).
pub fn access_ack(body: &[u8]) -> Result<Ack, FrameError> {
    let a = rkyv::access::<ArchivedAck, rancor::Error>(body)
        .map_err(|e| FrameError::Invalid(e.to_string()))?;
    Ok(Ack {
        core: a.core.to_native(),
        delta_id: a.delta_id.to_native(),
    })
}

/// Validates a snapshot chunk body (aligned) and its entries.
pub fn access_store_chunk(body: &[u8]) -> Result<&ArchivedStoreChunk, FrameError> {
    let c = rkyv::access::<ArchivedStoreChunk, rancor::Error>(body)
        .map_err(|e| FrameError::Invalid(e.to_string()))?;
    if c.version.to_native() != FRAMES_VERSION {
        return Err(FrameError::Version(c.version.to_native()));
    }
    if c.owners.len() > FRAME_ENTRIES_MAX {
        return Err(FrameError::TooManyOwners(c.owners.len()));
    }
    for e in c.entries.iter() {
        entry_parts(e)?;
    }
    Ok(c)
}

/// An archived entry's key and counters, checked; the sketch is validated too (decoded
/// into a scratch sketch and dropped), so a later `merge_bytes` cannot fail midway.
pub fn entry_parts(e: &ArchivedDeltaEntry) -> Result<(Key, Counters), FrameError> {
    let parts = entry_counters(e)?;
    Hll::from_bytes(e.users.as_slice())?;
    Ok(parts)
}

/// [`entry_parts`] without decoding the entry's user sketch: for a reader of the
/// counters only (billing's reconciliation), which never touches the sketch.
pub fn entry_counters(e: &ArchivedDeltaEntry) -> Result<(Key, Counters), FrameError> {
    let window = Window::from_u8(e.window).ok_or(FrameError::Window(e.window))?;
    let (kind, value) = (e.dim_kind, e.dim_value.to_native());
    let dim = Dim::from_parts(kind, value).ok_or(FrameError::Dim(kind, value))?;
    let key = Key {
        campaign_id: e.campaign_id.to_native(),
        window,
        bucket_start: e.bucket_start.to_native(),
        dim,
    };
    let c = Counters {
        clicks: e.clicks.to_native(),
        cost_micros: e.cost_micros.to_native(),
        fraud_clicks: e.fraud_clicks.to_native(),
    };
    Ok((key, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickgate_core::agg::{AggConfig, Aggregator};
    use clickgate_core::{Click, Device, EventId};
    use proptest::prelude::*;
    use std::borrow::Cow;

    fn sample_delta(n_users: u64) -> Delta {
        let mut a = Aggregator::new(AggConfig::default());
        for u in 0..n_users {
            let c = Click {
                event_id: EventId::default(),
                ts_ms: 1_764_201_600_000 + u,
                campaign_id: 1 + u % 3,
                ad_id: u % 7,
                publisher_id: 42,
                advertiser_id: 7,
                user_id: Cow::Owned(format!("u{u}")),
                ip: "203.0.113.7".parse().unwrap(),
                user_agent: Cow::Borrowed(""),
                country: *b"US",
                device: Device::Tablet,
                cost_micros: 10,
            };
            a.add(&c, u % 5 != 0, u % 5 == 0);
        }
        a.note_log_lsn(99);
        a.drain_delta()
    }

    fn body_of(framed: &[u8]) -> AlignedVec {
        let (body, used) = split_frame(framed, FRAME_BYTES_MAX).unwrap().unwrap();
        assert_eq!(used, framed.len());
        body
    }

    #[test]
    fn delta_round_trips() {
        let d = sample_delta(5_000);
        let frames = frames_from_delta(5, 6, 2, 10, &d);
        assert_eq!(frames.len(), 1);
        let mut buf = Vec::new();
        encode_delta(&frames[0], &mut buf).unwrap();
        let body = body_of(&buf);
        let f = access_delta(&body).unwrap();
        assert_eq!(
            (
                f.box_id.to_native(),
                f.instance_id.to_native(),
                f.core.to_native()
            ),
            (5, 6, 2)
        );
        assert_eq!((f.delta_id.to_native(), f.log_lsn.to_native()), (10, 99));
        let owners: Vec<(u64, u64)> = f
            .owners
            .iter()
            .map(|o| (o.campaign_id.to_native(), o.advertiser_id.to_native()))
            .collect();
        assert_eq!(owners, vec![(1, 7), (2, 7), (3, 7)]);
        assert_eq!(f.entries.len(), d.entries.len());
        for (a, e) in f.entries.iter().zip(&d.entries) {
            let (key, c) = entry_parts(a).unwrap();
            assert_eq!((key, c), (e.key, e.counters));
            assert_eq!(Hll::from_bytes(a.users.as_slice()).unwrap(), e.users);
        }
        let back: DeltaFrame = rkyv::deserialize::<DeltaFrame, rancor::Error>(f).unwrap();
        assert_eq!(back, frames[0]);
    }

    #[test]
    fn big_deltas_split_and_empty_ones_still_frame() {
        let mut d = sample_delta(10);
        let e = d.entries[0].clone();
        d.entries = (0..FRAME_ENTRIES_MAX as u64 * 2 + 1)
            .map(|i| {
                let mut e = e.clone();
                e.key.campaign_id = i;
                e
            })
            .collect();
        let frames = frames_from_delta(1, 1, 0, 7, &d);
        assert_eq!(
            frames.iter().map(|f| f.delta_id).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
        assert_eq!(
            frames.iter().map(|f| f.entries.len()).sum::<usize>(),
            d.entries.len()
        );
        let empty = frames_from_delta(
            1,
            1,
            0,
            3,
            &Delta {
                log_lsn: 4,
                entries: Vec::new(),
                owners: vec![(5, 6)],
            },
        );
        assert_eq!(empty.len(), 1);
        assert_eq!(
            (empty[0].delta_id, empty[0].log_lsn, empty[0].entries.len()),
            (3, 4, 0)
        );
        assert_eq!(
            empty[0].owners,
            vec![CampaignOwner {
                campaign_id: 5,
                advertiser_id: 6
            }]
        );
    }

    #[test]
    fn ack_and_chunk_round_trip() {
        let mut buf = Vec::new();
        encode_ack(
            &Ack {
                core: 3,
                delta_id: 77,
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(
            access_ack(&body_of(&buf)).unwrap(),
            Ack {
                core: 3,
                delta_id: 77
            }
        );

        let chunk = StoreChunk {
            version: FRAMES_VERSION,
            applied: vec![AppliedMark {
                box_id: 1,
                instance_id: 2,
                core: 3,
                delta_id: 4,
                log_lsn: 5,
                seen_ms: 6,
            }],
            entries: frames_from_delta(0, 0, 0, 1, &sample_delta(50))
                .remove(0)
                .entries,
            owners: vec![CampaignOwner {
                campaign_id: 1,
                advertiser_id: 7,
            }],
        };
        let mut buf = Vec::new();
        encode_store_chunk(&chunk, &mut buf).unwrap();
        let body = body_of(&buf);
        let c = access_store_chunk(&body).unwrap();
        assert_eq!(
            rkyv::deserialize::<StoreChunk, rancor::Error>(c).unwrap(),
            chunk
        );
    }

    #[test]
    fn rejects_bad_fields_and_sizes() {
        let mut f = frames_from_delta(0, 0, 0, 1, &sample_delta(20)).remove(0);
        let check = |f: &DeltaFrame, want: &str| {
            let mut buf = Vec::new();
            encode_delta(f, &mut buf).unwrap();
            let err = access_delta(&body_of(&buf)).err().unwrap().to_string();
            assert!(err.contains(want), "{err}");
        };
        f.entries[0].window = 3;
        check(&f, "window");
        f.entries[0].window = 0;
        let kind = f.entries[0].dim_kind;
        f.entries[0].dim_kind = 9;
        check(&f, "dimension");
        f.entries[0].dim_kind = kind;
        f.entries[0].users = vec![1, 14, 1, 0, 0, 0, 99];
        check(&f, "sketch");
        f.entries[0].users = Vec::new();
        let owner = f.owners[0];
        f.owners = vec![owner; FRAME_ENTRIES_MAX + 1];
        check(&f, "owners");
        f.owners.truncate(1);
        f.version = 1;
        check(&f, "version");
        assert!(matches!(
            frame_len(u32::MAX.to_le_bytes(), FRAME_BYTES_MAX),
            Err(FrameError::TooLarge(..))
        ));
        assert!(split_frame(&[1, 0], FRAME_BYTES_MAX).unwrap().is_none());
        assert!(split_frame(&[9, 0, 0, 0, 1], FRAME_BYTES_MAX)
            .unwrap()
            .is_none());
    }

    proptest! {
        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let body = aligned(&bytes);
            let _ = access_delta(&body);
            let _ = access_ack(&body);
            let _ = access_store_chunk(&body);
        }

        #[test]
        fn corrupted_frames_never_panic(at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let f = frames_from_delta(0, 0, 0, 1, &sample_delta(30)).remove(0);
            let mut buf = Vec::new();
            encode_delta(&f, &mut buf).unwrap();
            let mut body = buf[4..].to_vec();
            let i = at.index(body.len());
            body[i] = byte;
            let _ = access_delta(&aligned(&body));
        }
    }
}
