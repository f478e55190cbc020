//! Refilling counts lost with a crashed dataplane run, from the local log.
//!
//! A dataplane core counts each record right after appending it, so what a run counted is
//! a prefix of its core's log, and each delta says where that prefix ends (`log_lsn`).
//! When a run dies by `kill -9`, the records after its last applied delta are in the log
//! (ack=disk made them durable before their 202) but were never counted. The next run
//! opens the log at `start_lsn` and says so in its frames; the first time the store sees
//! that run, it counts the gap `[applied_lsn, start_lsn)` from the log with the same
//! aggregation code and applies it as a synthetic frame. That frame has an id derived
//! from the gap, goes through the WAL like any other, and is applied once.
//!
//! Nothing is refilled when the store knows nothing of the core (`applied_lsn` is None:
//! the marks expired, or the store is new): recounting from an unknown point could count
//! twice, which is worse for advertisers than a gap that billing still covers.

use std::path::Path;

use anyhow::{bail, Context};
use clickgate_core::agg::{AggConfig, Aggregator};
use clickgate_core::hash::mix64;
use clickgate_proto::frames::{
    encode_delta, frames_from_delta, split_frame, ArchivedDeltaFrame, FRAME_BYTES_MAX,
};
use clickgate_proto::record;
use clickgate_proto::segment::LogReader;
use rkyv::util::AlignedVec;

use crate::store::Store;

/// A gap this large is refilled in one go at most; beyond it, it is left to billing (the
/// writer thread must not stall for long).
pub const REFILL_RECORDS_MAX: u64 = 5_000_000;
/// Aggregate keys a refill holds, at most (one crashed flush interval needs few).
pub const REFILL_KEYS_MAX: usize = 1_000_000;

/// The frame bodies (aligned archives, as the writer applies and logs them) that count
/// the gap before `f`'s run, or None when there is nothing to refill.
pub fn refill_frames(
    store: &Store,
    f: &ArchivedDeltaFrame,
    log_root: &Path,
) -> anyhow::Result<Option<Vec<AlignedVec>>> {
    let (box_id, instance_id, core) = (
        f.box_id.to_native(),
        f.instance_id.to_native(),
        f.core.to_native(),
    );
    let start_lsn = f.start_lsn.to_native();
    if start_lsn == 0 || store.mark(box_id, instance_id, core).is_some() {
        return Ok(None);
    }
    let Some(applied) = store.applied_lsn(box_id, core) else {
        return Ok(None);
    };
    if applied >= start_lsn {
        return Ok(None);
    }
    let dir = log_root.join(format!("core-{core}"));
    let mut reader = LogReader::open(&dir, applied)
        .with_context(|| format!("opening {} at {applied}", dir.display()))?;
    let mut agg = Aggregator::new(AggConfig {
        keys_max: REFILL_KEYS_MAX,
        ..AggConfig::default()
    });
    let mut records = 0u64;
    while let Some((lsn, bytes)) = reader.next().context("reading the log")? {
        if lsn >= start_lsn {
            break;
        }
        records += 1;
        if records > REFILL_RECORDS_MAX {
            bail!("gap of more than {REFILL_RECORDS_MAX} records: left to billing");
        }
        let rec = record::decode(bytes).with_context(|| format!("record at {lsn}"))?;
        if !rec.flags.duplicate() {
            agg.add(&rec.click, !rec.flags.fraud(), rec.flags.fraud());
        }
    }
    if agg.overflow_total() > 0 {
        bail!("gap has more than {REFILL_KEYS_MAX} aggregate keys: left to billing");
    }
    agg.note_log_lsn(start_lsn);
    let delta = agg.drain_delta();
    // An id that is the same for the same gap, so a WAL replay of it is a duplicate.
    let refill_instance = mix64(0x5245_4649_4c4c ^ mix64(applied) ^ start_lsn.rotate_left(17));
    let mut out = Vec::new();
    for frame in frames_from_delta(box_id, refill_instance, core, 1, &delta) {
        let mut wire = Vec::new();
        encode_delta(&frame, &mut wire)?;
        match split_frame(&wire, FRAME_BYTES_MAX)? {
            Some((body, _)) => out.push(body),
            None => bail!("refill frame did not encode whole"),
        }
    }
    tracing::info!(
        box_id,
        core,
        from_lsn = applied,
        to_lsn = start_lsn,
        records,
        "refilled counts of a crashed dataplane run from the local log"
    );
    Ok(Some(out))
}
