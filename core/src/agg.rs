//! Per-core pre-aggregation: the step between the fraud gate and the controlplane,
//! shared by the stream path and replay/billing.
//!
//! ## What is counted
//! For each event, in its 5-minute bucket (event time, UTC), under five keys
//! `(campaign_id, window, bucket_start, dimension)` with dimension ∈ {all, country=CC,
//! device=D, ad=N, publisher=N}:
//! - billable clicks (valid, not duplicate, not fraud): `clicks += 1`, `cost_micros +=
//!   cost`, and `user_id` into the key's HyperLogLog (hashed with
//!   [`crate::hash::bytes_hash`]);
//! - fraud clicks: `fraud_clicks += 1` only (their users are not "unique users");
//! - duplicates: nothing at all.
//!
//! ## One window here, all windows in the store
//! The aggregator counts only the finest window ([`AggConfig::window`], 5m). Each 5m bucket
//! lies inside exactly one 1h and one 1d bucket, so the controlplane adds a 5m entry to its
//! 1h and 1d buckets as well ("an entry counts toward its window and every coarser one",
//! see [`Window::self_and_coarser`]). That is three times less work per event (5 map
//! updates and 5 sketch inserts instead of 15) and three times smaller deltas, with the
//! same numbers: counters add, sketches merge.
//!
//! ## Bounds and memory
//! At most [`AggConfig::keys_max`] keys live between two drains. At the bound a new key is
//! refused: that (event, dimension) update is not counted in real time and
//! [`Aggregator::overflow_total`] (metric `clickgate_agg_overflow_total`) goes up by one. Existing keys keep
//! counting. The event itself is still in the raw log, archived and billed (billing
//! replays the log, it does not read these counters).
//!
//! Bytes per active key on a core: one 64 B table slot (one cache line: key, counters,
//! up to 4 sketch registers inline) at table load 1/4–1/2, so 128–256 B, plus 4 B of
//! insertion order; the table keeps its size across drains and is at most 32 MiB per
//! core at the default `keys_max` (200k keys, 512Ki slots). Beyond 4 distinct billable
//! users of a key in the interval, a pooled sketch: 32 B, then a sparse table of ≤ 8 KiB
//! (≤ 1024 registers, ≤ 11 B per user), 16 KiB once dense. A dense sketch needs > 1024
//! distinct users of one key in one interval, so sketch memory stays below ~16 B per
//! (event × dimension) of an interval whatever the mix.
//!
//! ## Cost per event
//! Five keys are five independent cache lines: all five are prefetched before the
//! first is used (and the user id hashed meanwhile), so a cold event waits about one
//! memory latency, not five. Inserts into pooled sketches are deferred into a small
//! buffer and applied in a prefetching loop ([`Aggregator::drain_delta`] applies the rest
//! first; nothing reads a sketch before that, and HLL inserts commute).
//!
//! ## Allocation
//! After warm-up an event allocates nothing: the key table is emptied, keeping its
//! size, at each drain; sketches handed out in a [`Delta`] come back through [`Aggregator::recycle`]
//! with their sparse buffers, and new keys reuse them. The exceptions are amortised: a
//! sparse buffer growing past its previous capacity, and a sketch turning dense (once per
//! hot key per interval, ≥ 1024 distinct users apart). `drain_delta` itself may allocate
//! (once per interval, not per event).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use crate::event::{Click, Device};
use crate::hash::{bytes_hash, mix64};
use crate::hll::{Hll, HllPoint, HllPool};
use crate::window::Window;

/// A dimension of a key: the whole campaign or one value of one attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    All,
    Country([u8; 2]),
    Device(Device),
    Ad(u64),
    Publisher(u64),
}

impl Dim {
    pub const KIND_ALL: u8 = 0;
    pub const KIND_COUNTRY: u8 = 1;
    pub const KIND_DEVICE: u8 = 2;
    pub const KIND_AD: u8 = 3;
    pub const KIND_PUBLISHER: u8 = 4;

    /// Wire form: a kind byte and a value (country: the two ASCII bytes big-endian;
    /// device: its code; all: 0).
    pub fn to_parts(self) -> (u8, u64) {
        match self {
            Dim::All => (Self::KIND_ALL, 0),
            Dim::Country(c) => (Self::KIND_COUNTRY, u16::from_be_bytes(c) as u64),
            Dim::Device(d) => (Self::KIND_DEVICE, d as u64),
            Dim::Ad(a) => (Self::KIND_AD, a),
            Dim::Publisher(p) => (Self::KIND_PUBLISHER, p),
        }
    }

    /// Inverse of `to_parts`; `None` for anything `to_parts` cannot produce.
    pub fn from_parts(kind: u8, value: u64) -> Option<Dim> {
        Some(match kind {
            Self::KIND_ALL if value == 0 => Dim::All,
            Self::KIND_COUNTRY => {
                let v = u16::try_from(value).ok()?.to_be_bytes();
                if !v.iter().all(u8::is_ascii_uppercase) {
                    return None;
                }
                Dim::Country(v)
            }
            Self::KIND_DEVICE => Dim::Device(Device::from_u8(u8::try_from(value).ok()?)?),
            Self::KIND_AD => Dim::Ad(value),
            Self::KIND_PUBLISHER => Dim::Publisher(value),
            _ => return None,
        })
    }
}

/// What a count is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub campaign_id: u64,
    pub window: Window,
    pub bucket_start: u64,
    pub dim: Dim,
}

impl Key {
    /// A fixed 64-bit hash (no per-process seed).
    #[inline]
    pub fn hash64(&self) -> u64 {
        let (kind, value) = self.dim.to_parts();
        let a = self.campaign_id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let b = self.bucket_start ^ ((kind as u64) << 56 | (self.window as u64) << 48);
        mix64(a ^ mix64(b ^ value.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)))
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash64());
    }
}

/// Passes `Key::hash64` through: the key already mixed itself.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix64(self.0 ^ b as u64);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
}

pub type KeyMap<V> = HashMap<Key, V, BuildHasherDefault<KeyHasher>>;

/// Additive counters of one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub clicks: u64,
    pub cost_micros: u64,
    pub fraud_clicks: u64,
}

impl Counters {
    /// Saturates: counts come from frames a peer or a file supplied, and one with values
    /// near `u64::MAX` must not overflow (a panic in a debug build, a wrap in release).
    pub fn add(&mut self, o: &Counters) {
        self.clicks = self.clicks.saturating_add(o.clicks);
        self.cost_micros = self.cost_micros.saturating_add(o.cost_micros);
        self.fraud_clicks = self.fraud_clicks.saturating_add(o.fraud_clicks);
    }
}

/// One key's counts since the last drain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaEntry {
    pub key: Key,
    pub counters: Counters,
    /// Distinct billable `user_id`s.
    pub users: Hll,
}

/// Everything counted since the previous drain.
#[derive(Clone, Debug, Default)]
pub struct Delta {
    /// The highest log LSN noted before the drain ([`Aggregator::note_log_lsn`]).
    pub log_lsn: u64,
    pub entries: Vec<DeltaEntry>,
    /// `(campaign_id, advertiser_id)` of every campaign counted in this delta, sorted by
    /// campaign, one per campaign (the last advertiser seen wins): campaign ownership
    /// comes from the events themselves, and the query API's tenant isolation reads it.
    pub owners: Vec<(u64, u64)>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds `other`'s counts into this delta (same key: counters add, sketches merge).
    pub fn merge(&mut self, other: Delta) {
        self.log_lsn = self.log_lsn.max(other.log_lsn);
        if !other.owners.is_empty() {
            // `other` is the later delta: its owner of a campaign wins.
            let mut owners = other.owners;
            owners.extend_from_slice(&self.owners);
            owners.sort_by_key(|&(campaign, _)| campaign);
            owners.dedup_by_key(|&mut (campaign, _)| campaign);
            self.owners = owners;
        }
        let mut at: KeyMap<usize> = KeyMap::default();
        at.reserve(self.entries.len());
        for (i, e) in self.entries.iter().enumerate() {
            at.insert(e.key, i);
        }
        for e in other.entries {
            match at.get(&e.key) {
                Some(&i) => {
                    self.entries[i].counters.add(&e.counters);
                    self.entries[i].users.merge(&e.users);
                }
                None => {
                    at.insert(e.key, self.entries.len());
                    self.entries.push(e);
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct AggConfig {
    /// Keys (campaign × bucket × dimension) held between two drains, at most.
    pub keys_max: usize,
    /// The window counted; coarser windows are rolled up by the store.
    pub window: Window,
    /// Keys the table's slot hash (0: the fixed, unkeyed hash). The dataplane uses
    /// [`crate::hash::box_secret`]: campaign ids and dimension values come from clients,
    /// and with a known hash a client could aim keys at one probe chain. Deltas list keys
    /// in insertion order, so nothing a delta holds depends on it.
    pub hash_key: u64,
}

impl Default for AggConfig {
    fn default() -> Self {
        AggConfig {
            keys_max: 200_000,
            window: Window::M5,
            hash_key: 0,
        }
    }
}

/// Inline sketch entries in a slot, 3 bytes each (an [`HllPoint`] is 22 bits).
const SLOT_USERS_INLINE: usize = 4;
/// `Slot::kind` of a free slot.
const KIND_FREE: u8 = u8::MAX;
/// `Slot::users_len` of a slot whose sketch lives in `Aggregator::sketches`, at the index
/// held in the first 4 bytes of `users`.
const USERS_POOLED: u8 = u8::MAX;
/// Deferred pooled-sketch inserts held at most (8 B each).
const PENDING_INSERTS_MAX: usize = 512;
/// Slots of a table's first allocation.
const TABLE_SLOTS_MIN: usize = 1024;

/// One key's running counts, a cache line: the key, its counters and up to
/// `SLOT_USERS_INLINE` sketch entries inline (most keys see only a few users in an
/// interval), else an index into the sketch pool. One line per key means one cache miss
/// per (event, dimension) on a cold key, and a prefetch covers it.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Slot {
    campaign_id: u64,
    bucket_start: u64,
    /// `Dim::to_parts` value.
    value: u64,
    counters: Counters,
    /// `Dim::to_parts` kind, or `KIND_FREE`.
    kind: u8,
    /// Inline entries in `users`, or `USERS_POOLED`.
    users_len: u8,
    users: [u8; 3 * SLOT_USERS_INLINE],
}

const _: () = assert!(std::mem::size_of::<Slot>() == 64);

const FREE_SLOT: Slot = Slot {
    campaign_id: 0,
    bucket_start: 0,
    value: 0,
    counters: Counters {
        clicks: 0,
        cost_micros: 0,
        fraud_clicks: 0,
    },
    kind: KIND_FREE,
    users_len: 0,
    users: [0; 3 * SLOT_USERS_INLINE],
};

impl Slot {
    #[inline]
    fn is(&self, campaign_id: u64, bucket_start: u64, kind: u8, value: u64) -> bool {
        self.kind == kind
            && self.value == value
            && self.campaign_id == campaign_id
            && self.bucket_start == bucket_start
    }

    #[inline]
    fn inline_user(&self, i: usize) -> u32 {
        let u = &self.users[3 * i..3 * i + 3];
        u32::from_le_bytes([u[0], u[1], u[2], 0])
    }

    #[inline]
    fn set_inline_user(&mut self, i: usize, raw: u32) {
        self.users[3 * i..3 * i + 3].copy_from_slice(&raw.to_le_bytes()[..3]);
    }

    #[inline]
    fn pooled(&self) -> Option<u32> {
        (self.users_len == USERS_POOLED)
            .then(|| u32::from_le_bytes(self.users[..4].try_into().expect("4 bytes")))
    }

    fn dim(&self) -> Dim {
        match self.kind {
            Dim::KIND_ALL => Dim::All,
            Dim::KIND_COUNTRY => Dim::Country((self.value as u16).to_be_bytes()),
            Dim::KIND_DEVICE => {
                Dim::Device(Device::from_u8(self.value as u8).expect("stored from a Device"))
            }
            Dim::KIND_AD => Dim::Ad(self.value),
            Dim::KIND_PUBLISHER => Dim::Publisher(self.value),
            k => unreachable!("slot kind {k}"),
        }
    }
}

/// The slot hash of a key: `base` is [`key_hash_base`] of its campaign and bucket.
/// Keyed by `AggConfig::hash_key` (mixed in before the campaign id and again before the
/// dimension), so where a key lands is unknown to the client that chose it. The delta
/// walks keys in insertion order: its content and order do not depend on the key.
#[inline]
fn key_hash(base: u64, kind: u8, value: u64) -> u64 {
    mix64(base ^ value.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) ^ kind as u64)
}

#[inline]
fn key_hash_base(hash_key: u64, campaign_id: u64, bucket_start: u64) -> u64 {
    mix64(mix64(campaign_id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ hash_key) ^ bucket_start)
}

/// A hint that `p` is about to be read; never faults, whatever `p` is.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint with no architectural effect; it does not dereference
    // `p` and does not fault on any address (SSE, part of the x86_64 baseline).
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A core's pre-aggregator. Single-owner, no locks: each core has its own.
///
/// Keys live in an open-addressing table of one-cache-line `Slot`s (linear probing,
/// load ≤ 1/2), so an event's five keys cost five independent cache lines, all
/// prefetched before the first is used; sketches past `SLOT_USERS_INLINE` registers live
/// in a pool beside the table.
pub struct Aggregator {
    cfg: AggConfig,
    /// Power-of-two length; free slots have `kind == KIND_FREE`.
    table: Vec<Slot>,
    /// Table positions of the keys, in insertion order: what a drain walks (not the whole
    /// table), and the delta's order.
    order: Vec<u32>,
    /// Sketches of keys with more than `SLOT_USERS_INLINE` set registers.
    sketches: Vec<Hll>,
    /// Inserts into `sketches` not applied yet: (sketch, `HllPoint::raw`). Nothing reads
    /// a sketch before `drain_delta`, which applies them first, and inserts commute.
    pending: Vec<(u32, u32)>,
    /// A cleared entry vector from a recycled delta.
    spare_entries: Vec<DeltaEntry>,
    /// Buffers for growing sketches (bounded, see `HllPool`), refilled by `recycle`.
    pool: HllPool,
    /// `(campaign_id, advertiser_id)` pushed when a campaign's `all` key is created, i.e.
    /// once per (campaign, bucket) per interval, never per event; its capacity is kept
    /// across drains. Bounded by `keys_max` like the keys themselves.
    owners: Vec<(u64, u64)>,
    log_lsn: u64,
    overflow_total: u64,
}

/// What one event adds to each of its keys.
#[derive(Clone, Copy)]
struct Update {
    counters: Counters,
    user: Option<HllPoint>,
}

impl Aggregator {
    pub fn new(cfg: AggConfig) -> Aggregator {
        assert!(cfg.keys_max > 0, "keys_max");
        assert!(cfg.keys_max < u32::MAX as usize / 2, "keys_max");
        Aggregator {
            cfg,
            table: vec![FREE_SLOT; TABLE_SLOTS_MIN],
            order: Vec::new(),
            sketches: Vec::new(),
            pending: Vec::with_capacity(PENDING_INSERTS_MAX),
            spare_entries: Vec::new(),
            pool: HllPool::default(),
            owners: Vec::new(),
            log_lsn: 0,
            overflow_total: 0,
        }
    }

    pub fn config(&self) -> &AggConfig {
        &self.cfg
    }

    /// Keys counted since the last drain.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// (event, dimension) updates refused at `keys_max` since start: the dataplane's
    /// `clickgate_agg_overflow_total`.
    pub fn overflow_total(&self) -> u64 {
        self.overflow_total
    }

    /// Records that every event added so far is in the core's log up to `lsn`; the next
    /// delta carries it.
    pub fn note_log_lsn(&mut self, lsn: u64) {
        self.log_lsn = self.log_lsn.max(lsn);
    }

    /// Counts one event. `billable`: valid, not duplicate, not fraud. `fraud`: not a
    /// duplicate, judged fraud. Neither (a duplicate): nothing is counted.
    #[inline]
    pub fn add(&mut self, click: &Click<'_>, billable: bool, fraud: bool) {
        if !billable && !fraud {
            return;
        }
        debug_assert!(!(billable && fraud), "a fraud click is not billable");
        if billable {
            prefetch(click.user_id.as_ptr());
        }
        let bucket_start = self.cfg.window.bucket_start(click.ts_ms);
        let dims = [
            Dim::All,
            Dim::Country(click.country),
            Dim::Device(click.device),
            Dim::Ad(click.ad_id),
            Dim::Publisher(click.publisher_id),
        ]
        .map(Dim::to_parts);
        let base = key_hash_base(self.cfg.hash_key, click.campaign_id, bucket_start);
        let hashes = dims.map(|(kind, value)| key_hash(base, kind, value));
        // The five keys are independent: start all five (likely cold) lines loading
        // before waiting on the first, and hash the user meanwhile.
        let mask = self.table.len() - 1;
        for h in hashes {
            prefetch(self.table.as_ptr().wrapping_add(h as usize & mask).cast());
        }
        let update = if fraud {
            Update {
                counters: Counters {
                    fraud_clicks: 1,
                    ..Counters::default()
                },
                user: None,
            }
        } else {
            Update {
                counters: Counters {
                    clicks: 1,
                    cost_micros: click.cost_micros,
                    fraud_clicks: 0,
                },
                // Hashed and split once for the five sketches.
                user: Some(HllPoint::of_hash(bytes_hash(click.user_id.as_bytes()))),
            }
        };
        if self.pending.len() + dims.len() > PENDING_INSERTS_MAX {
            self.flush_pending();
        }
        let keys_before = self.order.len();
        for (&(kind, value), &h) in dims.iter().zip(&hashes) {
            let pooled = self.add_to(click.campaign_id, bucket_start, kind, value, h, &update);
            if let (Some(p), Some(at)) = (update.user, pooled) {
                self.pending.push((at, p.raw()));
            }
        }
        // `Dim::All` goes first, so if it created a key that key is at `keys_before`:
        // a campaign's owner is noted once per new (campaign, bucket), not per event.
        if let Some(&at) = self.order.get(keys_before) {
            if self.table[at as usize].kind == Dim::KIND_ALL {
                self.owners.push((click.campaign_id, click.advertiser_id));
            }
        }
    }

    /// Applies the deferred inserts into pooled sketches as one loop that prefetches a
    /// few inserts ahead (the sketch, then the line the insert touches), so their cache
    /// misses overlap instead of stalling the event that caused them.
    fn flush_pending(&mut self) {
        const AHEAD: usize = 8;
        let (pending, sketches, pool) = (&self.pending, &mut self.sketches, &mut self.pool);
        for j in 0..pending.len() {
            if let Some(&(s, _)) = pending.get(j + 2 * AHEAD) {
                prefetch((&sketches[s as usize] as *const Hll).cast());
            }
            if let Some(&(s, p)) = pending.get(j + AHEAD) {
                prefetch(sketches[s as usize].insert_addr(HllPoint::from_raw(p)));
            }
            let (s, p) = pending[j];
            sketches[s as usize].insert_pooled(HllPoint::from_raw(p), pool);
        }
        self.pending.clear();
    }

    /// Counts `u` under one key, creating it if there is room. Returns the key's pooled
    /// sketch, if it has one and `u` has a user for it, for the caller to insert into.
    #[inline]
    fn add_to(
        &mut self,
        campaign_id: u64,
        bucket_start: u64,
        kind: u8,
        value: u64,
        hash: u64,
        u: &Update,
    ) -> Option<u32> {
        let mask = self.table.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            let s = &self.table[i];
            if s.kind == KIND_FREE {
                break;
            }
            if s.is(campaign_id, bucket_start, kind, value) {
                return self.update_slot(i, u);
            }
            i = (i + 1) & mask;
        }
        if self.order.len() >= self.cfg.keys_max {
            self.overflow_total += 1;
            return None;
        }
        if (self.order.len() + 1) * 2 > self.table.len() {
            self.grow();
            return self.add_to(campaign_id, bucket_start, kind, value, hash, u);
        }
        self.table[i] = Slot {
            campaign_id,
            bucket_start,
            value,
            kind,
            ..FREE_SLOT
        };
        self.order.push(i as u32);
        self.update_slot(i, u)
    }

    #[inline]
    fn update_slot(&mut self, i: usize, u: &Update) -> Option<u32> {
        let s = &mut self.table[i];
        s.counters.add(&u.counters);
        let p = u.user?;
        if let Some(pooled) = s.pooled() {
            return Some(pooled);
        }
        let n = s.users_len as usize;
        for k in 0..n {
            let e = s.inline_user(k);
            if e >> 8 == p.idx() {
                if p.raw() > e {
                    s.set_inline_user(k, p.raw());
                }
                return None;
            }
        }
        if n < SLOT_USERS_INLINE {
            s.set_inline_user(n, p.raw());
            s.users_len += 1;
            return None;
        }
        Some(self.spill_users(i))
    }

    /// Moves a slot's inline sketch entries into a pooled sketch.
    #[cold]
    #[inline(never)]
    fn spill_users(&mut self, i: usize) -> u32 {
        let mut h = Hll::default();
        let s = &mut self.table[i];
        for k in 0..s.users_len as usize {
            h.insert_pooled(HllPoint::from_raw(s.inline_user(k)), &mut self.pool);
        }
        let at = u32::try_from(self.sketches.len()).expect("sketches < keys_max < u32::MAX");
        self.sketches.push(h);
        s.users_len = USERS_POOLED;
        s.users[..4].copy_from_slice(&at.to_le_bytes());
        at
    }

    /// Doubles the table (amortised: the table keeps its size across drains).
    #[cold]
    #[inline(never)]
    fn grow(&mut self) {
        let bigger = vec![FREE_SLOT; 2 * self.table.len()];
        let old = std::mem::replace(&mut self.table, bigger);
        let mask = self.table.len() - 1;
        for at in &mut self.order {
            let s = &old[*at as usize];
            let h = key_hash(
                key_hash_base(self.cfg.hash_key, s.campaign_id, s.bucket_start),
                s.kind,
                s.value,
            );
            let mut i = h as usize & mask;
            while self.table[i].kind != KIND_FREE {
                i = (i + 1) & mask;
            }
            self.table[i] = *s;
            *at = i as u32;
        }
    }

    /// Takes everything counted since the last drain, in key-creation order; the
    /// aggregator starts empty again (keeping its table's size).
    pub fn drain_delta(&mut self) -> Delta {
        self.flush_pending();
        let mut entries = std::mem::take(&mut self.spare_entries);
        entries.clear();
        entries.reserve(self.order.len());
        const AHEAD: usize = 8;
        for (j, &at) in self.order.iter().enumerate() {
            if let Some(&next) = self.order.get(j + AHEAD) {
                prefetch(self.table.as_ptr().wrapping_add(next as usize).cast());
            }
            let s = &mut self.table[at as usize];
            let users = match s.pooled() {
                Some(p) => std::mem::take(&mut self.sketches[p as usize]),
                None => {
                    let mut h = Hll::new();
                    for k in 0..s.users_len as usize {
                        h.insert(HllPoint::from_raw(s.inline_user(k)));
                    }
                    h
                }
            };
            entries.push(DeltaEntry {
                key: Key {
                    campaign_id: s.campaign_id,
                    window: self.cfg.window,
                    bucket_start: s.bucket_start,
                    dim: s.dim(),
                },
                counters: s.counters,
                users,
            });
            // The other fields are rewritten when the slot is taken again.
            s.kind = KIND_FREE;
        }
        self.order.clear();
        self.sketches.clear();
        // Stable sort, then keep each campaign's last entry: the latest advertiser wins.
        self.owners.sort_by_key(|&(campaign, _)| campaign);
        let mut owners = Vec::with_capacity(self.owners.len());
        for (i, &(campaign, advertiser)) in self.owners.iter().enumerate() {
            if self
                .owners
                .get(i + 1)
                .is_none_or(|&(next, _)| next != campaign)
            {
                owners.push((campaign, advertiser));
            }
        }
        self.owners.clear();
        Delta {
            log_lsn: self.log_lsn,
            entries,
            owners,
        }
    }

    /// Gives a drained delta's buffers back for reuse (optional; without it the next
    /// interval allocates fresh sketches). Only sketches with a heap buffer are worth
    /// keeping: the others cost nothing to make.
    pub fn recycle(&mut self, mut delta: Delta) {
        // Every sketch buffer goes back to the pool by size class; new sketches start
        // inline and grow through the pool's classes, so after warm-up growing takes no
        // allocation whatever the next interval's keys look like.
        for mut e in delta.entries.drain(..) {
            e.users.recycle_into(&mut self.pool);
        }
        if delta.entries.capacity() > self.spare_entries.capacity() {
            self.spare_entries = delta.entries;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_saturates() {
        let mut c = Counters {
            clicks: u64::MAX - 1,
            cost_micros: 5,
            fraud_clicks: u64::MAX,
        };
        c.add(&Counters {
            clicks: 3,
            cost_micros: 7,
            fraud_clicks: 1,
        });
        assert_eq!(
            (c.clicks, c.cost_micros, c.fraud_clicks),
            (u64::MAX, 12, u64::MAX)
        );
    }
    use crate::event::EventId;
    use crate::hash::mix64;
    use std::borrow::Cow;

    const T0: u64 = 1_764_201_600_000; // 2025-11-27T00:00:00Z, aligned to every window

    fn click(
        campaign: u64,
        ts: u64,
        ad: u64,
        country: &[u8; 2],
        device: Device,
        user: &str,
        cost: u64,
    ) -> Click<'static> {
        Click {
            event_id: EventId::default(),
            ts_ms: ts,
            campaign_id: campaign,
            ad_id: ad,
            publisher_id: 42,
            advertiser_id: 7,
            user_id: Cow::Owned(user.to_string()),
            ip: "203.0.113.7".parse().unwrap(),
            user_agent: Cow::Borrowed(""),
            country: *country,
            device,
            cost_micros: cost,
        }
    }

    fn find(d: &Delta, campaign: u64, bucket: u64, dim: Dim) -> Option<&DeltaEntry> {
        d.entries.iter().find(|e| {
            e.key.campaign_id == campaign && e.key.bucket_start == bucket && e.key.dim == dim
        })
    }

    /// `want`: (clicks, cost_micros, fraud_clicks, unique users).
    fn check(d: &Delta, campaign: u64, bucket: u64, dim: Dim, want: (u64, u64, u64, u64)) {
        let e = find(d, campaign, bucket, dim)
            .unwrap_or_else(|| panic!("no key {campaign} {bucket} {dim:?}"));
        assert_eq!(
            (
                e.counters.clicks,
                e.counters.cost_micros,
                e.counters.fraud_clicks,
                e.users.estimate()
            ),
            want,
            "{campaign} {bucket} {dim:?}"
        );
    }

    /// Campaign ids aimed at one slot of the unkeyed table land all over a keyed one, and
    /// the key changes nothing in the deltas (content and order).
    #[test]
    fn a_keyed_table_spreads_aimed_keys_and_deltas_do_not_change() {
        let mask = (TABLE_SLOTS_MIN - 1) as u64;
        let slot = |key: u64, c: u64| key_hash(key_hash_base(key, c, T0), Dim::KIND_ALL, 0) & mask;
        let target = slot(0, 1);
        let aimed: Vec<u64> = (1..).filter(|&c| slot(0, c) == target).take(64).collect();
        let key = 0x5eed_1234_abcd_ef01;
        let mut spread: Vec<u64> = aimed.iter().map(|&c| slot(key, c)).collect();
        spread.sort_unstable();
        spread.dedup();
        assert!(spread.len() > 48, "{} distinct slots of 64", spread.len());

        let mut plain = Aggregator::new(AggConfig::default());
        let mut keyed = Aggregator::new(AggConfig {
            hash_key: key,
            ..AggConfig::default()
        });
        for (i, &c) in aimed.iter().enumerate() {
            let u = format!("u{i}");
            let k = click(c, T0 + i as u64, i as u64 % 3, b"US", Device::Mobile, &u, 5);
            plain.add(&k, true, false);
            keyed.add(&k, true, false);
        }
        let (a, b) = (plain.drain_delta(), keyed.drain_delta());
        assert_eq!(a.entries.len(), b.entries.len());
        for (x, y) in a.entries.iter().zip(&b.entries) {
            assert_eq!(x.key, y.key);
            assert_eq!(x.counters, y.counters);
            assert_eq!(x.users.estimate(), y.users.estimate());
        }
    }

    #[test]
    fn known_clicks_give_exact_numbers() {
        let mut a = Aggregator::new(AggConfig::default());
        let m = Device::Mobile;
        a.add(&click(1, T0 + 1, 10, b"US", m, "u1", 100), true, false);
        a.add(&click(1, T0 + 2, 10, b"US", m, "u1", 100), true, false);
        a.add(
            &click(1, T0 + 3, 11, b"FR", Device::Desktop, "u2", 50),
            true,
            false,
        );
        a.add(
            &click(1, T0 + 4, 11, b"FR", Device::Desktop, "u3", 50),
            false,
            true,
        ); // fraud
        a.add(
            &click(1, T0 + 5, 11, b"FR", Device::Desktop, "u4", 50),
            false,
            false,
        ); // dup
        a.add(&click(1, T0 + 300_000, 10, b"US", m, "u5", 7), true, false); // next bucket
        a.add(&click(2, T0 - 1, 10, b"US", m, "u1", 1), true, false); // late, previous bucket
        a.note_log_lsn(17);

        let d = a.drain_delta();
        assert_eq!(d.log_lsn, 17);
        assert!(d.entries.iter().all(|e| e.key.window == Window::M5));
        check(&d, 1, T0, Dim::All, (3, 250, 1, 2));
        check(&d, 1, T0, Dim::Country(*b"US"), (2, 200, 0, 1));
        check(&d, 1, T0, Dim::Country(*b"FR"), (1, 50, 1, 1));
        check(&d, 1, T0, Dim::Device(Device::Desktop), (1, 50, 1, 1));
        check(&d, 1, T0, Dim::Ad(10), (2, 200, 0, 1));
        check(&d, 1, T0, Dim::Ad(11), (1, 50, 1, 1));
        check(&d, 1, T0, Dim::Publisher(42), (3, 250, 1, 2));
        check(&d, 1, T0 + 300_000, Dim::All, (1, 7, 0, 1));
        check(&d, 2, T0 - 300_000, Dim::All, (1, 1, 0, 1));
        // 5 dims for (1, T0) plus the extra country/device/ad of the FR clicks, 5 + 5.
        assert_eq!(d.entries.len(), 8 + 5 + 5);
        assert!(a.is_empty());
        a.recycle(d);
        assert!(a.drain_delta().is_empty());
    }

    #[test]
    fn keys_are_bounded_and_overflow_is_counted() {
        let mut a = Aggregator::new(AggConfig {
            keys_max: 7,
            window: Window::M5,
            hash_key: 0,
        });
        a.add(
            &click(1, T0, 10, b"US", Device::Mobile, "u", 1),
            true,
            false,
        ); // 5 keys
        a.add(
            &click(1, T0, 11, b"US", Device::Mobile, "u", 1),
            true,
            false,
        ); // +1 (ad 11)
        a.add(
            &click(2, T0, 10, b"US", Device::Mobile, "u", 1),
            true,
            false,
        ); // +1 then 4 refused
        assert_eq!(a.len(), 7);
        assert_eq!(a.overflow_total(), 4);
        a.add(
            &click(1, T0, 10, b"US", Device::Mobile, "u", 1),
            true,
            false,
        ); // existing keys
        assert_eq!(a.overflow_total(), 4);
        let d = a.drain_delta();
        check(&d, 1, T0, Dim::All, (3, 3, 0, 1));
        check(&d, 2, T0, Dim::All, (1, 1, 0, 1));
        assert!(find(&d, 2, T0, Dim::Ad(10)).is_none());
    }

    #[test]
    fn drains_are_disjoint_and_recycling_pools_sketch_buffers() {
        let mut a = Aggregator::new(AggConfig::default());
        for round in 0..3u64 {
            for u in 0..100u64 {
                a.add(
                    &click(
                        1,
                        T0,
                        10,
                        b"US",
                        Device::Mobile,
                        &format!("u{u}"),
                        round + 1,
                    ),
                    true,
                    false,
                );
            }
            let d = a.drain_delta();
            check(&d, 1, T0, Dim::All, (100, 100 * (round + 1), 0, 100));
            let sketches = d
                .entries
                .iter()
                .filter(|e| e.users.heap_bytes() > 0)
                .count();
            assert_eq!(
                sketches, 5,
                "100 users: every key's sketch has a heap buffer"
            );
            a.recycle(d);
            assert!(
                a.pool.buffers() >= 5,
                "the 5 buffers (and outgrown ones) are pooled"
            );
        }
    }

    #[test]
    fn delta_merge_adds_and_unions() {
        let mut a = Aggregator::new(AggConfig::default());
        a.add(
            &click(1, T0, 10, b"US", Device::Mobile, "u1", 5),
            true,
            false,
        );
        let mut d1 = a.drain_delta();
        a.add(
            &click(1, T0, 10, b"US", Device::Mobile, "u2", 5),
            true,
            false,
        );
        a.add(
            &click(3, T0, 10, b"US", Device::Mobile, "u1", 5),
            false,
            true,
        );
        a.note_log_lsn(9);
        d1.merge(a.drain_delta());
        assert_eq!(d1.log_lsn, 9);
        check(&d1, 1, T0, Dim::All, (2, 10, 0, 2));
        check(&d1, 3, T0, Dim::All, (0, 0, 1, 0));
        assert_eq!(d1.entries.len(), 10);
    }

    /// The slot table, inline/pooled sketches, deferred inserts and growth against a
    /// plain ordered map doing the documented rule, over several drains and a tight
    /// `keys_max`, with enough users per key to spill and go dense.
    #[test]
    fn matches_a_plain_map_model() {
        use std::collections::BTreeMap;
        for keys_max in [40usize, 3_000, 200_000] {
            let mut a = Aggregator::new(AggConfig {
                keys_max,
                window: Window::M5,
                hash_key: mix64(keys_max as u64),
            });
            let mut overflow = 0u64;
            let mut x = 7u64;
            for round in 0..3u64 {
                let mut model: BTreeMap<Key, (Counters, Hll)> = BTreeMap::new();
                for _ in 0..20_000 {
                    x = mix64(x.wrapping_add(round));
                    let c = click(
                        if x >> 60 < 6 { 1 } else { 1 + x % 50 }, // one hot campaign
                        T0 + (x >> 8) % 900_000,
                        (x >> 16) % 40,
                        if x >> 20 & 1 == 0 { b"US" } else { b"FR" },
                        Device::ALL[((x >> 24) % 5) as usize],
                        &format!("u{}", (x >> 28) % 5_000),
                        (x >> 40) % 1000,
                    );
                    let (billable, fraud) = match (x >> 50) % 10 {
                        0 => (false, true),
                        1 => (false, false),
                        _ => (true, false),
                    };
                    a.add(&c, billable, fraud);
                    if !billable && !fraud {
                        continue;
                    }
                    for dim in [
                        Dim::All,
                        Dim::Country(c.country),
                        Dim::Device(c.device),
                        Dim::Ad(c.ad_id),
                        Dim::Publisher(c.publisher_id),
                    ] {
                        let key = Key {
                            campaign_id: c.campaign_id,
                            window: Window::M5,
                            bucket_start: Window::M5.bucket_start(c.ts_ms),
                            dim,
                        };
                        if !model.contains_key(&key) && model.len() >= keys_max {
                            overflow += 1;
                            continue;
                        }
                        let (counters, users) = model.entry(key).or_default();
                        if billable {
                            counters.clicks += 1;
                            counters.cost_micros += c.cost_micros;
                            users.insert_hash(bytes_hash(c.user_id.as_bytes()));
                        } else {
                            counters.fraud_clicks += 1;
                        }
                    }
                }
                assert_eq!(a.len(), model.len());
                assert_eq!(a.overflow_total(), overflow);
                let d = a.drain_delta();
                let mut got: Vec<_> = d
                    .entries
                    .iter()
                    .map(|e| (e.key, e.counters, e.users.to_bytes()))
                    .collect();
                got.sort_by_key(|g| g.0);
                let want: Vec<_> = model
                    .iter()
                    .map(|(k, (c, u))| (*k, *c, u.to_bytes()))
                    .collect();
                assert!(got == want, "keys_max {keys_max} round {round}");
                if keys_max == 200_000 {
                    assert!(d.entries.iter().any(|e| e.users.is_dense()));
                }
                a.recycle(d);
            }
        }
    }

    #[test]
    fn same_input_gives_the_same_delta_in_the_same_order() {
        let run = || {
            let mut a = Aggregator::new(AggConfig::default());
            for i in 0..5_000u64 {
                let c = click(
                    i % 97,
                    T0 + i * 100,
                    i % 13,
                    b"DE",
                    Device::Tablet,
                    &format!("u{}", i % 211),
                    i,
                );
                a.add(&c, i % 7 != 0, i % 7 == 0);
            }
            a.drain_delta().entries
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn dim_parts_round_trip_and_reject_garbage() {
        for d in [
            Dim::All,
            Dim::Country(*b"US"),
            Dim::Device(Device::Ctv),
            Dim::Ad(u64::MAX),
            Dim::Publisher(0),
        ] {
            let (k, v) = d.to_parts();
            assert_eq!(Dim::from_parts(k, v), Some(d));
        }
        for (k, v) in [(0, 1), (1, 0x7573), (1, 1 << 16), (2, 5), (5, 0)] {
            assert_eq!(Dim::from_parts(k, v), None, "{k} {v}");
        }
    }

    #[test]
    fn bytes_per_key_as_documented() {
        assert!(
            std::mem::size_of::<Key>() <= 40,
            "{}",
            std::mem::size_of::<Key>()
        );
        assert!(
            std::mem::size_of::<DeltaEntry>() <= 112,
            "{}",
            std::mem::size_of::<DeltaEntry>()
        );
    }

    #[test]
    fn owners_are_noted_once_per_campaign_and_the_latest_wins() {
        let mut a = Aggregator::new(AggConfig::default());
        let mut c = click(1, T0, 10, b"US", Device::Mobile, "u1", 5);
        c.advertiser_id = 100;
        a.add(&c, true, false);
        a.add(&c, false, true);
        c.ts_ms = T0 + 400_000; // another bucket: another `all` key
        a.add(&c, true, false);
        let mut d = click(2, T0, 11, b"FR", Device::Desktop, "u2", 5);
        d.advertiser_id = 200;
        a.add(&d, false, false); // a duplicate counts nothing, owns nothing
        assert_eq!(a.drain_delta().owners, vec![(1, 100)]);
        a.add(&d, true, false);
        c.advertiser_id = 101;
        a.add(&c, true, false);
        let mut first = a.drain_delta();
        assert_eq!(first.owners, vec![(1, 101), (2, 200)]);
        c.advertiser_id = 102;
        a.add(&c, true, false);
        first.merge(a.drain_delta());
        assert_eq!(first.owners, vec![(1, 102), (2, 200)]);
        assert!(a.drain_delta().owners.is_empty());
    }
}
