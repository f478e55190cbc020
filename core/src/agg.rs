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
//! [`Aggregator::overflow_total`] (metric `agg_overflow`) goes up by one. Existing keys keep
//! counting. The event itself is still in the raw log, archived and billed (billing
//! replays the log, it does not read these counters).
//!
//! Bytes per active key on a core: one hash-map slot holding key 32 B + counters 24 B +
//! sketch 32 B (up to 6 users inline) = 88 B, ≈ 100 B at the map's 7/8 load plus its
//! control byte; beyond 6 distinct billable users of that key in the interval, 4 B per
//! user while sparse (≤ 1024 users, ≤ 4 KiB), 16 KiB once dense. A dense sketch needs > 1024 distinct
//! users of one key in one interval, so sketch memory stays below ~16 B per (event ×
//! dimension) of an interval whatever the mix.
//!
//! ## Allocation
//! After warm-up an event allocates nothing: the key map is drained, keeping its
//! capacity, at each drain; sketches handed out in a [`Delta`] come back through [`Aggregator::recycle`]
//! with their sparse buffers, and new keys reuse them. The exceptions are amortised: a
//! sparse buffer growing past its previous capacity, and a sketch turning dense (once per
//! hot key per interval, ≥ 1024 distinct users apart). `drain_delta` itself may allocate
//! (once per interval, not per event).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use crate::event::{Click, Device};
use crate::hash::{bytes_hash, mix64};
use crate::hll::Hll;
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
    pub fn add(&mut self, o: &Counters) {
        self.clicks += o.clicks;
        self.cost_micros += o.cost_micros;
        self.fraud_clicks += o.fraud_clicks;
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
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds `other`'s counts into this delta (same key: counters add, sketches merge).
    pub fn merge(&mut self, other: Delta) {
        self.log_lsn = self.log_lsn.max(other.log_lsn);
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
}

impl Default for AggConfig {
    fn default() -> Self {
        AggConfig {
            keys_max: 200_000,
            window: Window::M5,
        }
    }
}

/// A key's running counts inside the aggregator.
#[derive(Default)]
struct Slot {
    counters: Counters,
    users: Hll,
}

/// A core's pre-aggregator. Single-owner, no locks: each core has its own.
pub struct Aggregator {
    cfg: AggConfig,
    /// Counts live in the map itself: one probe per (event, dimension).
    map: KeyMap<Slot>,
    /// Cleared sketches from recycled deltas, reused for new keys.
    spare_users: Vec<Hll>,
    /// A cleared entry vector from a recycled delta.
    spare_entries: Vec<DeltaEntry>,
    log_lsn: u64,
    overflow_total: u64,
}

impl Aggregator {
    pub fn new(cfg: AggConfig) -> Aggregator {
        assert!(cfg.keys_max > 0, "keys_max");
        Aggregator {
            cfg,
            map: KeyMap::default(),
            spare_users: Vec::new(),
            spare_entries: Vec::new(),
            log_lsn: 0,
            overflow_total: 0,
        }
    }

    pub fn config(&self) -> &AggConfig {
        &self.cfg
    }

    /// Keys counted since the last drain.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// (event, dimension) updates refused at `keys_max` since start: the `agg_overflow`
    /// metric.
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
        let bucket_start = self.cfg.window.bucket_start(click.ts_ms);
        let (counters, user) = if fraud {
            (
                Counters {
                    fraud_clicks: 1,
                    ..Counters::default()
                },
                None,
            )
        } else {
            let c = Counters {
                clicks: 1,
                cost_micros: click.cost_micros,
                fraud_clicks: 0,
            };
            (c, Some(bytes_hash(click.user_id.as_bytes())))
        };
        for dim in [
            Dim::All,
            Dim::Country(click.country),
            Dim::Device(click.device),
            Dim::Ad(click.ad_id),
            Dim::Publisher(click.publisher_id),
        ] {
            let key = Key {
                campaign_id: click.campaign_id,
                window: self.cfg.window,
                bucket_start,
                dim,
            };
            self.add_to(key, &counters, user);
        }
    }

    #[inline]
    fn add_to(&mut self, key: Key, c: &Counters, user: Option<u64>) {
        let at_bound = self.map.len() >= self.cfg.keys_max;
        let slot = match self.map.entry(key) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(_) if at_bound => {
                self.overflow_total += 1;
                return;
            }
            Entry::Vacant(v) => {
                let users = self.spare_users.pop().unwrap_or_default();
                v.insert(Slot {
                    counters: Counters::default(),
                    users,
                })
            }
        };
        slot.counters.add(c);
        if let Some(h) = user {
            slot.users.insert_hash(h);
        }
    }

    /// Takes everything counted since the last drain; the aggregator starts empty again
    /// (keeping its map's capacity).
    pub fn drain_delta(&mut self) -> Delta {
        let mut entries = std::mem::take(&mut self.spare_entries);
        entries.clear();
        entries.reserve(self.map.len());
        entries.extend(self.map.drain().map(|(key, s)| DeltaEntry {
            key,
            counters: s.counters,
            users: s.users,
        }));
        Delta {
            log_lsn: self.log_lsn,
            entries,
        }
    }

    /// Gives a drained delta's buffers back for reuse (optional; without it the next
    /// interval allocates fresh sketches).
    pub fn recycle(&mut self, mut delta: Delta) {
        for mut e in delta.entries.drain(..) {
            if self.spare_users.len() >= self.cfg.keys_max {
                break;
            }
            e.users.clear();
            self.spare_users.push(e.users);
        }
        if delta.entries.capacity() > self.spare_entries.capacity() {
            self.spare_entries = delta.entries;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventId;
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
    fn drains_are_disjoint_and_recycling_reuses_sketches() {
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
            a.recycle(d);
            assert_eq!(a.spare_users.len(), 5);
            assert!(a
                .spare_users
                .iter()
                .all(|h| h.is_empty() && h.heap_bytes() >= 400));
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
}
