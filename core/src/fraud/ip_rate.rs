//! The per-IP minute counter: clicks per (ip, UTC minute of `ts`), box-wide, bounded.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::hash::mix64;
use crate::ratelimit::SpinCell;

/// Slots per set, scanned linearly.
const IP_RATE_WAYS: usize = 8;

#[derive(Clone, Copy, Default)]
struct RateSlot {
    key: u128,
    /// UTC minute (ts_ms / 60000, which fits 32 bits until the year 10136) and clicks in
    /// it, for the latest minute seen and the one before (events arrive a little out of
    /// order).
    minute: u32,
    count: u32,
    prev_count: u32,
    /// Set tick of the last hit: the slot hit longest ago (by wrapping distance from the
    /// set's tick) is evicted.
    touched: u32,
}

/// The slots of one set, their tags and the set's own tick. The tags (a 32-bit hash
/// fragment of each slot's address, 0: free) sit with the tick in the set's first cache
/// line, so a hit reads that line and the one slot it finds (32 bytes), not every slot.
#[derive(Default)]
#[repr(C)]
struct RateSet {
    tick: u32,
    tags: [u32; IP_RATE_WAYS],
    slots: [RateSlot; IP_RATE_WAYS],
}

/// Clicks per (ip, UTC minute of event time) for the whole box: every core counts into
/// the same table, so an address's count (and the `ip_rate` threshold) is the box's,
/// whatever core receives its clicks. A fixed table of at most `addresses_max` addresses
/// (set-associative; a newcomer to a full set evicts the address hit least recently),
/// each set behind its own spin lock ([`SpinCell`]). An evicted address starts again from
/// zero, so eviction only ever under-counts; a flood of addresses costs a bounded table,
/// never growth. Memory: [`IpRate::memory_bytes`].
///
/// Each address keeps its latest minute and the one before; a click older than that is
/// counted as the first of its minute (it cannot be judged by rate in the stream; billing
/// judges it exactly).
pub struct IpRate {
    ways: usize,
    sets: Box<[SpinCell<RateSet>]>,
    tracked: AtomicUsize,
    evictions: AtomicU64,
    /// Keys the set an address maps to (0: fixed); see [`crate::hash::box_secret`].
    /// Addresses here come from the events' `ip` field, which clients write: with a known
    /// set mapping, one could evict its own counter by clicking as addresses of its set.
    hash_key: u64,
}

impl IpRate {
    /// The same table with its sets keyed by `key`.
    pub fn keyed(mut self, key: u64) -> Self {
        self.hash_key = key;
        self
    }

    /// A table of `addresses_max` addresses (rounded down to whole sets, at least 1).
    pub fn new(addresses_max: usize) -> IpRate {
        let addresses_max = addresses_max.max(1);
        let ways = IP_RATE_WAYS.min(addresses_max);
        let sets = addresses_max / ways;
        IpRate {
            ways,
            sets: (0..sets)
                .map(|_| SpinCell::new(RateSet::default()))
                .collect(),
            tracked: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
            hash_key: 0,
        }
    }

    /// Counts one click of `ip` at event time `ts_ms`; returns the clicks of that IP in
    /// that UTC minute so far, this one included.
    pub fn hit(&self, ip: IpAddr, ts_ms: u64) -> u32 {
        let key = canonical(ip);
        let minute = (ts_ms / 60_000).min(u64::from(u32::MAX)) as u32;
        let h = mix64(key as u64 ^ mix64((key >> 64) as u64 ^ self.hash_key));
        let set = ((h as u128 * self.sets.len() as u128) >> 64) as usize;
        let tag = (h as u32) | 1;
        let nways = self.ways;
        self.sets[set].with(|set| {
            set.tick = set.tick.wrapping_add(1);
            let tick = set.tick;
            let hit = (0..nways).find(|&i| set.tags[i] == tag && set.slots[i].key == key);
            if let Some(i) = hit {
                let s = &mut set.slots[i];
                s.touched = tick;
                return if minute == s.minute {
                    s.count = s.count.saturating_add(1);
                    s.count
                } else if minute > s.minute {
                    s.prev_count = if minute == s.minute + 1 { s.count } else { 0 };
                    s.minute = minute;
                    s.count = 1;
                    1
                } else if minute + 1 == s.minute {
                    s.prev_count = s.prev_count.saturating_add(1);
                    s.prev_count
                } else {
                    1
                };
            }
            let victim = match (0..nways).find(|&i| set.tags[i] == 0) {
                Some(i) => {
                    self.tracked.fetch_add(1, Ordering::Relaxed);
                    i
                }
                None => {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    (0..nways)
                        .max_by_key(|&i| tick.wrapping_sub(set.slots[i].touched))
                        .expect("a set has ways")
                }
            };
            set.tags[victim] = tag;
            set.slots[victim] = RateSlot {
                key,
                minute,
                count: 1,
                prev_count: 0,
                touched: tick,
            };
            1
        })
    }

    /// Addresses holding a slot.
    pub fn tracked(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    /// Addresses evicted to make room since creation.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// The most addresses the table holds.
    pub fn capacity(&self) -> usize {
        self.sets.len() * self.ways
    }

    /// Bytes of the table.
    pub fn memory_bytes(&self) -> usize {
        self.sets.len() * std::mem::size_of::<SpinCell<RateSet>>()
    }
}

fn canonical(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => 0xffff_0000_0000 | u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}
