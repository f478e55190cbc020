//! The embedded counter store: merged counters and sketches per (window, bucket,
//! campaign, dimension), in memory, with retention. Persistence is [`crate::durable`]'s.
//!
//! Layout: `BTreeMap<(window, bucket_start), HashMap<(campaign_id, dim), Cell>>`. A
//! campaign query walks the bucket range of one window in order (ascending for free) and
//! does one hash lookup per bucket; top-N scans one bucket's `ad=N` cells; eviction drops
//! whole buckets from the front of each window.
//!
//! Merge rules: a delta entry counts toward its own window and every coarser one
//! (frames: 5m entries also fill 1h and 1d); snapshot entries count exactly where they are.
//! Idempotency: a delta frame is applied only if its `delta_id` is above the last one
//! applied for its `(box_id, instance_id, core)`; the marks live in the store itself, so a
//! snapshot and a WAL replay agree on what was applied.
//!
//! Ownership: `campaign_id → advertiser_id` as the frames carry it (from the events; the
//! latest applied wins), persisted in the snapshot chunks; the query API's tenant
//! isolation reads it. A campaign whose buckets are all evicted loses its entry, so the
//! map never holds more campaigns than the cells do.
//!
//! Bounds: `cells_max` cells (each ≈ 150 B + its sketch: 4 B per distinct user while
//! ≤ 1024, then 16 KiB). Past it a new cell is refused and counted (`store_overflow_total`);
//! existing cells keep counting. Retention evicts old buckets, which frees cells.

use std::collections::{BTreeMap, HashMap};

use clickgate_core::agg::{Counters, Dim};
use clickgate_core::hash::SecretIdBuildHasher;
use clickgate_core::hll::Hll;
use clickgate_core::window::Window;
use clickgate_proto::frames::{
    entry_counters, entry_parts, AppliedMark, ArchivedDeltaEntry, ArchivedDeltaFrame,
    ArchivedStoreChunk, CampaignOwner, DeltaEntry, FrameError, StoreChunk, FRAMES_VERSION,
    FRAME_ENTRIES_MAX,
};

/// How long each window's buckets are kept, counted from the bucket's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub m5_ms: u64,
    pub h1_ms: u64,
    pub d1_ms: u64,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600 * 1000;
        Retention {
            m5_ms: DAY,
            h1_ms: 7 * DAY,
            d1_ms: 90 * DAY,
        }
    }
}

impl Retention {
    pub fn of(&self, w: Window) -> u64 {
        match w {
            Window::M5 => self.m5_ms,
            Window::H1 => self.h1_ms,
            Window::D1 => self.d1_ms,
        }
    }

    /// Whether a bucket starting at `start` is still retained at `now_ms`.
    pub fn keeps(&self, w: Window, start: u64, now_ms: u64) -> bool {
        start.saturating_add(w.len_ms()).saturating_add(self.of(w)) > now_ms
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cell {
    pub counters: Counters,
    pub users: Hll,
}

/// One bucket of a campaign series, as the query API answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BucketOut {
    pub start: u64,
    pub clicks: u64,
    pub unique_users: u64,
    pub cost_micros: u64,
    pub fraud_clicks: u64,
}

/// One ad of a top-N answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TopAd {
    pub ad_id: u64,
    pub campaign_id: u64,
    pub clicks: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    pub delta_id: u64,
    pub log_lsn: u64,
    pub seen_ms: u64,
}

/// Counters the store keeps about itself (exported on `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub frames_applied: u64,
    pub frames_duplicate: u64,
    /// Clicks (billable + fraud) of entries whose bucket was past retention, per window.
    pub late_dropped: [u64; 3],
    /// Entries refused at `cells_max`.
    pub overflow: u64,
    pub evicted_buckets: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Applied,
    Duplicate,
}

/// Keyed by ids clients choose: hashed with the process's secret (cheap, not steerable).
type Bucket = HashMap<(u64, Dim), Cell, SecretIdBuildHasher>;

pub struct Store {
    buckets: BTreeMap<(Window, u64), Bucket>,
    applied: HashMap<(u64, u64, u32), Mark>,
    /// `campaign_id → advertiser_id`.
    owners: HashMap<u64, u64>,
    cells: usize,
    cells_max: usize,
    retention: Retention,
    stats: StoreStats,
    /// Keep only the `all` click and cost counters of this window's buckets starting in
    /// `[from, to)`, without user sketches (billing's reconciliation reads nothing else).
    only: Option<(Window, u64, u64)>,
}

/// Marks of dataplane runs not seen for this long are forgotten (a restarted dataplane
/// gets a new instance id, so old marks only guard WAL replays, which are far shorter).
pub const MARK_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// Marks kept at most; past it the least recently seen go first.
pub const MARKS_MAX: usize = 65_536;

impl Store {
    pub fn new(retention: Retention, cells_max: usize) -> Store {
        Store {
            buckets: BTreeMap::new(),
            applied: HashMap::new(),
            owners: HashMap::new(),
            cells: 0,
            cells_max,
            retention,
            stats: StoreStats::default(),
            only: None,
        }
    }

    /// A store that keeps only the `all` counters (clicks, cost; no user sketches) of
    /// `window`'s buckets starting in `[from_ms, to_ms)`: what billing's reconciliation
    /// reads, loaded several times faster than the whole store.
    pub fn counters_only(retention: Retention, window: Window, from_ms: u64, to_ms: u64) -> Store {
        Store {
            only: Some((window, from_ms, to_ms)),
            ..Store::new(retention, usize::MAX)
        }
    }

    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    pub fn cells(&self) -> usize {
        self.cells
    }

    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// The last delta applied for a dataplane core run.
    pub fn mark(&self, box_id: u64, instance_id: u64, core: u32) -> Option<Mark> {
        self.applied.get(&(box_id, instance_id, core)).copied()
    }

    /// The highest log LSN applied from `(box_id, core)` across its runs: where a
    /// restarted dataplane would replay its log from.
    pub fn applied_lsn(&self, box_id: u64, core: u32) -> Option<u64> {
        self.applied
            .iter()
            .filter(|((b, _, c), _)| *b == box_id && *c == core)
            .map(|(_, m)| m.log_lsn)
            .max()
    }

    /// Whether a frame with this id was applied already.
    pub fn is_applied(&self, box_id: u64, instance_id: u64, core: u32, delta_id: u64) -> bool {
        self.applied
            .get(&(box_id, instance_id, core))
            .is_some_and(|m| delta_id <= m.delta_id)
    }

    /// Applies a validated delta frame (see [`clickgate_proto::frames::access_delta`]) once.
    pub fn apply_frame(
        &mut self,
        f: &ArchivedDeltaFrame,
        now_ms: u64,
    ) -> Result<Applied, FrameError> {
        let id = (
            f.box_id.to_native(),
            f.instance_id.to_native(),
            f.core.to_native(),
        );
        let delta_id = f.delta_id.to_native();
        if self.is_applied(id.0, id.1, id.2, delta_id) {
            if let Some(m) = self.applied.get_mut(&id) {
                m.seen_ms = m.seen_ms.max(now_ms);
            }
            self.stats.frames_duplicate += 1;
            return Ok(Applied::Duplicate);
        }
        // Validate everything before changing anything.
        for e in f.entries.iter() {
            match self.only {
                Some(_) => entry_counters(e)?,
                None => entry_parts(e)?,
            };
        }
        for e in f.entries.iter() {
            self.apply_entry(e, true, now_ms)?;
        }
        for o in f.owners.iter() {
            self.owners
                .insert(o.campaign_id.to_native(), o.advertiser_id.to_native());
        }
        self.applied.insert(
            id,
            Mark {
                delta_id,
                log_lsn: f.log_lsn.to_native(),
                seen_ms: now_ms,
            },
        );
        self.stats.frames_applied += 1;
        Ok(Applied::Applied)
    }

    fn apply_entry(
        &mut self,
        e: &ArchivedDeltaEntry,
        roll_up: bool,
        now_ms: u64,
    ) -> Result<(), FrameError> {
        let (key, c) = match self.only {
            Some(_) => entry_counters(e)?,
            None => entry_parts(e)?,
        };
        let windows: &[Window] = if roll_up {
            key.window.self_and_coarser()
        } else {
            std::slice::from_ref(&key.window)
        };
        for &w in windows {
            let start = w.bucket_start(key.bucket_start);
            if let Some((only, from, to)) = self.only {
                if w != only || key.dim != Dim::All || start < from || start >= to {
                    continue;
                }
            }
            if !self.retention.keeps(w, start, now_ms) {
                // Every click is in exactly one `all` entry: count it there only.
                if key.dim == Dim::All {
                    let late = &mut self.stats.late_dropped[w as usize];
                    *late = late.saturating_add(c.clicks.saturating_add(c.fraud_clicks));
                }
                continue;
            }
            let at_bound = self.cells >= self.cells_max;
            let bucket = self.buckets.entry((w, start)).or_default();
            let cell = match bucket.get_mut(&(key.campaign_id, key.dim)) {
                Some(cell) => cell,
                None if at_bound => {
                    self.stats.overflow += 1;
                    continue;
                }
                None => {
                    self.cells += 1;
                    bucket.entry((key.campaign_id, key.dim)).or_default()
                }
            };
            cell.counters.add(&c);
            if self.only.is_none() {
                cell.users.merge_bytes(e.users.as_slice())?;
            }
        }
        Ok(())
    }

    /// Wall-clock ms at which the store last applied (or was re-sent) a delta frame from
    /// any dataplane core; 0 before the first. With traffic flowing, `now` minus this
    /// bounds how stale the answers are (the freshness metric).
    pub fn last_apply_ms(&self) -> u64 {
        self.applied.values().map(|m| m.seen_ms).max().unwrap_or(0)
    }

    /// The advertiser a campaign's events named (`None`: no data about it is retained).
    pub fn owner(&self, campaign_id: u64) -> Option<u64> {
        self.owners.get(&campaign_id).copied()
    }

    /// `(campaign_id, advertiser_id)` of the campaigns with retained data, ascending by
    /// campaign; only `advertiser`'s when given.
    pub fn campaigns(&self, advertiser: Option<u64>) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .owners
            .iter()
            .filter(|(_, &a)| advertiser.is_none_or(|want| want == a))
            .map(|(&c, &a)| (c, a))
            .collect();
        v.sort_unstable();
        v
    }

    /// Drops buckets past retention and marks of long-gone dataplane runs.
    pub fn evict(&mut self, now_ms: u64) {
        let buckets_before = self.buckets.len();
        for w in Window::ALL {
            let stale: Vec<(Window, u64)> = self
                .buckets
                .range((w, 0)..=(w, u64::MAX))
                .take_while(|((_, start), _)| !self.retention.keeps(w, *start, now_ms))
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                if let Some(b) = self.buckets.remove(&k) {
                    self.cells -= b.len();
                    self.stats.evicted_buckets += 1;
                }
            }
        }
        if self.buckets.len() < buckets_before {
            // Forget owners of campaigns with no cell left (once per evicted bucket batch).
            let live: std::collections::HashSet<u64> = self
                .buckets
                .values()
                .flat_map(|b| b.keys().map(|&(campaign, _)| campaign))
                .collect();
            self.owners.retain(|c, _| live.contains(c));
        }
        self.applied
            .retain(|_, m| m.seen_ms.saturating_add(MARK_TTL_MS) > now_ms);
        if self.applied.len() > MARKS_MAX {
            let mut seen: Vec<u64> = self.applied.values().map(|m| m.seen_ms).collect();
            seen.sort_unstable();
            let cutoff = seen[seen.len() - MARKS_MAX];
            self.applied.retain(|_, m| m.seen_ms >= cutoff);
        }
    }

    /// A campaign's buckets of `window` with start in `[from_ms, to_ms)`, ascending,
    /// empty ones omitted.
    pub fn series(
        &self,
        campaign_id: u64,
        window: Window,
        dim: Dim,
        from_ms: u64,
        to_ms: u64,
    ) -> Vec<BucketOut> {
        if to_ms <= from_ms {
            return Vec::new();
        }
        self.buckets
            .range((window, from_ms)..(window, to_ms))
            .filter_map(|(&(_, start), b)| {
                let cell = b.get(&(campaign_id, dim))?;
                let c = cell.counters;
                if c == Counters::default() && cell.users.is_empty() {
                    return None;
                }
                Some(BucketOut {
                    start,
                    clicks: c.clicks,
                    unique_users: cell.users.estimate(),
                    cost_micros: c.cost_micros,
                    fraud_clicks: c.fraud_clicks,
                })
            })
            .collect()
    }

    /// A campaign's counters summed over the buckets of `window` with start in
    /// `[from_ms, to_ms)`, per value of one dimension kind (`Dim::KIND_COUNTRY`, …), most
    /// billable clicks first (ties: the lower value). Cost: a scan of every cell of those
    /// buckets (they are keyed by campaign and value, not indexed by kind), so the dashboard
    /// asks for it over the range it shows, at most `query_buckets_max` buckets.
    pub fn breakdown(
        &self,
        campaign_id: u64,
        window: Window,
        kind: u8,
        from_ms: u64,
        to_ms: u64,
    ) -> Vec<(Dim, Counters)> {
        if to_ms <= from_ms {
            return Vec::new();
        }
        let mut sums: HashMap<Dim, Counters> = HashMap::new();
        for b in self
            .buckets
            .range((window, from_ms)..(window, to_ms))
            .map(|(_, b)| b)
        {
            for (&(c, dim), cell) in b {
                if c == campaign_id && dim.to_parts().0 == kind {
                    sums.entry(dim).or_default().add(&cell.counters);
                }
            }
        }
        let mut v: Vec<(Dim, Counters)> = sums.into_iter().collect();
        v.sort_unstable_by(|a, b| b.1.clicks.cmp(&a.1.clicks).then(a.0.cmp(&b.0)));
        v
    }

    /// The `n` ads with most billable clicks in one bucket; ties: lower campaign id, then
    /// lower ad id first.
    pub fn top_ads(&self, window: Window, bucket_start: u64, n: usize) -> Vec<TopAd> {
        self.top_ads_where(window, bucket_start, n, |_| true)
    }

    /// [`Store::top_ads`] among the campaigns `keep` accepts (a tenant's own).
    pub fn top_ads_where(
        &self,
        window: Window,
        bucket_start: u64,
        n: usize,
        keep: impl Fn(u64) -> bool,
    ) -> Vec<TopAd> {
        let Some(b) = self.buckets.get(&(window, bucket_start)) else {
            return Vec::new();
        };
        let mut ads: Vec<TopAd> = b
            .iter()
            .filter_map(|(&(campaign_id, dim), cell)| match dim {
                Dim::Ad(ad_id) if cell.counters.clicks > 0 && keep(campaign_id) => Some(TopAd {
                    ad_id,
                    campaign_id,
                    clicks: cell.counters.clicks,
                }),
                _ => None,
            })
            .collect();
        let order = |a: &TopAd, b: &TopAd| {
            b.clicks
                .cmp(&a.clicks)
                .then(a.campaign_id.cmp(&b.campaign_id))
                .then(a.ad_id.cmp(&b.ad_id))
        };
        if n < ads.len() {
            ads.select_nth_unstable_by(n, order);
            ads.truncate(n);
        }
        ads.sort_unstable_by(order);
        ads
    }

    /// The whole store as snapshot chunks (the first carries the marks), in the order a
    /// fresh store would accept them.
    pub fn to_chunks(&self) -> Vec<StoreChunk> {
        let mut chunks = vec![StoreChunk {
            version: FRAMES_VERSION,
            applied: self
                .applied
                .iter()
                .map(|(&(box_id, instance_id, core), m)| AppliedMark {
                    box_id,
                    instance_id,
                    core,
                    delta_id: m.delta_id,
                    log_lsn: m.log_lsn,
                    seen_ms: m.seen_ms,
                })
                .collect(),
            entries: Vec::new(),
            owners: Vec::new(),
        }];
        let mut owners: Vec<CampaignOwner> = self
            .owners
            .iter()
            .map(|(&campaign_id, &advertiser_id)| CampaignOwner {
                campaign_id,
                advertiser_id,
            })
            .collect();
        owners.sort_unstable_by_key(|o| o.campaign_id);
        for part in owners.chunks(FRAME_ENTRIES_MAX) {
            chunks.push(StoreChunk {
                version: FRAMES_VERSION,
                applied: Vec::new(),
                entries: Vec::new(),
                owners: part.to_vec(),
            });
        }
        for (&(window, start), b) in &self.buckets {
            for (&(campaign_id, dim), cell) in b {
                if chunks
                    .last()
                    .is_some_and(|c| c.entries.len() >= FRAME_ENTRIES_MAX)
                {
                    chunks.push(StoreChunk {
                        version: FRAMES_VERSION,
                        applied: Vec::new(),
                        entries: Vec::new(),
                        owners: Vec::new(),
                    });
                }
                let key = clickgate_core::agg::Key {
                    campaign_id,
                    window,
                    bucket_start: start,
                    dim,
                };
                let entry = DeltaEntry::from_parts(&key, &cell.counters, &cell.users);
                chunks.last_mut().expect("non-empty").entries.push(entry);
            }
        }
        chunks
    }

    /// Loads one validated snapshot chunk (exact: no roll-up; retention still applies).
    pub fn load_chunk(&mut self, c: &ArchivedStoreChunk, now_ms: u64) -> Result<(), FrameError> {
        for m in c.applied.iter() {
            let id = (
                m.box_id.to_native(),
                m.instance_id.to_native(),
                m.core.to_native(),
            );
            let mark = Mark {
                delta_id: m.delta_id.to_native(),
                log_lsn: m.log_lsn.to_native(),
                seen_ms: m.seen_ms.to_native(),
            };
            let slot = self.applied.entry(id).or_default();
            if mark.delta_id >= slot.delta_id {
                *slot = mark;
            }
        }
        for e in c.entries.iter() {
            self.apply_entry(e, false, now_ms)?;
        }
        for o in c.owners.iter() {
            self.owners
                .insert(o.campaign_id.to_native(), o.advertiser_id.to_native());
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use clickgate_core::{Click, Device, EventId};
    use std::borrow::Cow;

    pub fn click(campaign: u64, ts: u64, ad: u64, user: &str, cost: u64) -> Click<'static> {
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
            country: *b"US",
            device: Device::Mobile,
            cost_micros: cost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::click;
    use super::*;
    use clickgate_core::agg::{AggConfig, Aggregator};
    use clickgate_core::Click;
    use clickgate_proto::frames::{
        access_delta, access_store_chunk, encode_delta, encode_store_chunk, frames_from_delta,
        split_frame, DeltaFrame, FRAME_BYTES_MAX,
    };

    const T0: u64 = 1_764_201_600_000;
    const NOW: u64 = T0 + 600_000;

    fn frame_bytes(clicks: &[Click<'static>], box_id: u64, core: u32, delta_id: u64) -> Vec<u8> {
        let mut a = Aggregator::new(AggConfig::default());
        for c in clicks {
            a.add(c, true, false);
        }
        let mut buf = Vec::new();
        for f in frames_from_delta(box_id, 1, core, delta_id, &a.drain_delta()) {
            encode_delta(&f, &mut buf).unwrap();
        }
        buf
    }

    fn apply(s: &mut Store, framed: &[u8], now: u64) -> Applied {
        let (body, _) = split_frame(framed, FRAME_BYTES_MAX).unwrap().unwrap();
        s.apply_frame(access_delta(&body).unwrap(), now).unwrap()
    }

    fn totals(s: &Store, campaign: u64, w: Window) -> Vec<(u64, u64, u64, u64)> {
        s.series(campaign, w, Dim::All, 0, u64::MAX)
            .iter()
            .map(|b| (b.start, b.clicks, b.cost_micros, b.unique_users))
            .collect()
    }

    #[test]
    fn applies_once_per_delta_id_and_rolls_up() {
        let mut s = Store::new(Retention::default(), 1_000);
        let f1 = frame_bytes(
            &[
                click(1, T0 + 1, 10, "a", 5),
                click(1, T0 + 300_001, 10, "b", 7),
            ],
            9,
            0,
            1,
        );
        assert_eq!(apply(&mut s, &f1, NOW), Applied::Applied);
        assert_eq!(apply(&mut s, &f1, NOW), Applied::Duplicate);
        // Same id from another core or box is a different delta.
        let f1_core1 = frame_bytes(&[click(1, T0 + 2, 11, "a", 1)], 9, 1, 1);
        assert_eq!(apply(&mut s, &f1_core1, NOW), Applied::Applied);
        // An older id after a newer one is a duplicate.
        let f3 = frame_bytes(&[click(1, T0 + 3, 10, "c", 1)], 9, 0, 3);
        assert_eq!(apply(&mut s, &f3, NOW), Applied::Applied);
        let f2 = frame_bytes(&[click(1, T0 + 3, 10, "c", 1)], 9, 0, 2);
        assert_eq!(apply(&mut s, &f2, NOW), Applied::Duplicate);

        assert_eq!(
            totals(&s, 1, Window::M5),
            vec![(T0, 3, 7, 2), (T0 + 300_000, 1, 7, 1)]
        );
        assert_eq!(totals(&s, 1, Window::H1), vec![(T0, 4, 14, 3)]);
        assert_eq!(totals(&s, 1, Window::D1), vec![(T0, 4, 14, 3)]);
        assert_eq!(s.stats().frames_applied, 3);
        assert_eq!(s.stats().frames_duplicate, 2);
        assert_eq!(s.mark(9, 1, 0).unwrap().delta_id, 3);
    }

    #[test]
    fn merge_order_does_not_matter() {
        let frames: Vec<Vec<u8>> = (0..4u32)
            .map(|core| {
                frame_bytes(
                    &[click(1, T0 + core as u64, 10, &format!("u{}", core % 2), 3)],
                    1,
                    core,
                    1,
                )
            })
            .collect();
        let mut a = Store::new(Retention::default(), 1_000);
        let mut b = Store::new(Retention::default(), 1_000);
        for f in &frames {
            apply(&mut a, f, NOW);
        }
        for f in frames.iter().rev() {
            apply(&mut b, f, NOW);
            apply(&mut b, f, NOW);
        }
        for w in Window::ALL {
            assert_eq!(totals(&a, 1, w), totals(&b, 1, w));
            assert_eq!(totals(&a, 1, w), vec![(w.bucket_start(T0), 4, 12, 2)]);
        }
    }

    /// Found by the `store_wal` fuzz target: counts near `u64::MAX` in two frames (or one
    /// late frame) overflowed the cell and the late-drop counter.
    #[test]
    fn huge_counts_saturate() {
        let entry = |window_start: u64| DeltaEntry {
            campaign_id: 1,
            window: Window::M5.as_u8(),
            bucket_start: window_start,
            dim_kind: Dim::KIND_ALL,
            dim_value: 0,
            clicks: u64::MAX - 1,
            cost_micros: u64::MAX,
            fraud_clicks: u64::MAX,
            users: Vec::new(),
        };
        let frame = |delta_id: u64, entries: Vec<DeltaEntry>| {
            let mut buf = Vec::new();
            let f = DeltaFrame {
                version: FRAMES_VERSION,
                box_id: 1,
                instance_id: 1,
                core: 0,
                delta_id,
                log_lsn: 0,
                start_lsn: 0,
                entries,
                owners: Vec::new(),
            };
            encode_delta(&f, &mut buf).unwrap();
            buf
        };
        let mut s = Store::new(Retention::default(), 1_000);
        apply(&mut s, &frame(1, vec![entry(T0)]), NOW);
        apply(&mut s, &frame(2, vec![entry(T0)]), NOW);
        let b = s.series(1, Window::M5, Dim::All, 0, u64::MAX);
        assert_eq!((b[0].clicks, b[0].cost_micros), (u64::MAX, u64::MAX));
        // Far past retention: counted as late, saturating too.
        apply(&mut s, &frame(3, vec![entry(0), entry(0)]), NOW);
        assert_eq!(s.stats().late_dropped[0], u64::MAX);
    }

    #[test]
    fn late_entries_past_retention_are_counted_not_stored() {
        let r = Retention::default();
        let mut s = Store::new(r, 1_000);
        let day = 24 * 3600 * 1000;
        let now = T0 + 2 * day; // T0's 5m bucket is gone, its 1h and 1d buckets remain
        apply(
            &mut s,
            &frame_bytes(&[click(1, T0, 10, "a", 5)], 1, 0, 1),
            now,
        );
        assert!(totals(&s, 1, Window::M5).is_empty());
        assert_eq!(totals(&s, 1, Window::H1), vec![(T0, 1, 5, 1)]);
        assert_eq!(s.stats().late_dropped, [1, 0, 0]);
    }

    #[test]
    fn eviction_follows_retention() {
        let r = Retention {
            m5_ms: 600_000,
            h1_ms: 3_600_000,
            d1_ms: 86_400_000,
        };
        let mut s = Store::new(r, 1_000);
        apply(
            &mut s,
            &frame_bytes(&[click(1, T0, 10, "a", 5)], 1, 0, 1),
            T0,
        );
        let cells = s.cells();
        assert_eq!(cells, 3 * 5);
        s.evict(T0 + 300_000 + 599_999); // the 5m bucket ends at +5m, kept 10 more minutes
        assert_eq!(s.cells(), cells);
        s.evict(T0 + 300_000 + 600_000);
        assert_eq!(s.cells(), 2 * 5);
        assert!(totals(&s, 1, Window::M5).is_empty());
        s.evict(T0 + 2 * 86_400_000 + 1);
        assert_eq!((s.cells(), s.buckets()), (0, 0));
        assert_eq!(s.stats().evicted_buckets, 3);
    }

    #[test]
    fn cells_are_bounded() {
        let mut s = Store::new(Retention::default(), 12);
        apply(
            &mut s,
            &frame_bytes(&[click(1, T0, 10, "a", 5)], 1, 0, 1),
            NOW,
        );
        assert_eq!(s.cells(), 12);
        assert_eq!(s.stats().overflow, 3);
        assert_eq!(totals(&s, 1, Window::M5), vec![(T0, 1, 5, 1)]);
    }

    #[test]
    fn top_ads_order_and_ties() {
        let mut s = Store::new(Retention::default(), 1_000);
        let mut clicks = Vec::new();
        for (campaign, ad, n) in [(1, 10, 3), (2, 20, 5), (1, 11, 3), (3, 5, 3), (2, 21, 1)] {
            for i in 0..n {
                clicks.push(click(campaign, T0 + i, ad, "u", 1));
            }
        }
        apply(&mut s, &frame_bytes(&clicks, 1, 0, 1), NOW);
        let top: Vec<(u64, u64, u64)> = s
            .top_ads(Window::M5, T0, 4)
            .iter()
            .map(|t| (t.ad_id, t.campaign_id, t.clicks))
            .collect();
        assert_eq!(top, vec![(20, 2, 5), (10, 1, 3), (11, 1, 3), (5, 3, 3)]);
        assert_eq!(s.top_ads(Window::M5, T0, 100).len(), 5);
        assert!(s.top_ads(Window::M5, T0 + 300_000, 3).is_empty());
        assert_eq!(s.top_ads(Window::D1, T0, 1)[0].ad_id, 20);
    }

    #[test]
    fn snapshot_chunks_rebuild_the_same_store() {
        let mut s = Store::new(Retention::default(), 100_000);
        let clicks: Vec<_> = (0..3000u64)
            .map(|i| click(i % 700, T0 + i * 1000, i % 13, &format!("u{i}"), i))
            .collect();
        apply(&mut s, &frame_bytes(&clicks, 4, 2, 8), NOW);
        let mut t = Store::new(Retention::default(), 100_000);
        let chunks = s.to_chunks();
        assert!(chunks.len() > 1);
        for c in &chunks {
            let mut buf = Vec::new();
            encode_store_chunk(c, &mut buf).unwrap();
            let (body, _) = split_frame(&buf, FRAME_BYTES_MAX).unwrap().unwrap();
            t.load_chunk(access_store_chunk(&body).unwrap(), NOW)
                .unwrap();
        }
        assert_eq!(t.cells(), s.cells());
        assert_eq!(t.mark(4, 1, 2), s.mark(4, 1, 2));
        for campaign in [0, 1, 699] {
            for w in Window::ALL {
                assert_eq!(totals(&t, campaign, w), totals(&s, campaign, w));
            }
        }
        assert_eq!(t.top_ads(Window::H1, T0, 5), s.top_ads(Window::H1, T0, 5));
        assert_eq!(t.campaigns(None), s.campaigns(None));
        assert_eq!(t.campaigns(None).len(), 700);
    }

    #[test]
    fn a_counters_only_store_holds_the_same_day_totals_from_frames_and_snapshots() {
        let day = T0 - T0 % 86_400_000;
        let clicks: Vec<_> = (0..3000u64)
            .map(|i| click(i % 70, T0 + i * 40_000, i % 13, &format!("u{i}"), i))
            .collect();
        let framed = frame_bytes(&clicks, 4, 2, 8);
        let mut full = Store::new(Retention::default(), 100_000);
        apply(&mut full, &framed, NOW);
        let mut only = Store::counters_only(Retention::default(), Window::D1, day, day + 1);
        apply(&mut only, &framed, NOW);
        let mut from_chunks = Store::counters_only(Retention::default(), Window::D1, day, day + 1);
        for c in &full.to_chunks() {
            let mut buf = Vec::new();
            encode_store_chunk(c, &mut buf).unwrap();
            let (body, _) = split_frame(&buf, FRAME_BYTES_MAX).unwrap().unwrap();
            from_chunks
                .load_chunk(access_store_chunk(&body).unwrap(), NOW)
                .unwrap();
        }
        let counters = |s: &Store, c: u64| {
            s.series(c, Window::D1, Dim::All, day, day + 1)
                .iter()
                .map(|b| (b.start, b.clicks, b.cost_micros))
                .collect::<Vec<_>>()
        };
        for campaign in 0..70 {
            let want = counters(&full, campaign);
            assert_eq!(want.len(), 1, "campaign {campaign}");
            assert_eq!(counters(&only, campaign), want);
            assert_eq!(counters(&from_chunks, campaign), want);
        }
        // Nothing else is kept.
        assert!(only.series(1, Window::H1, Dim::All, 0, u64::MAX).is_empty());
        assert_eq!(only.cells(), 70);
    }

    #[test]
    fn breakdown_sums_a_campaigns_values_over_the_range() {
        let mut s = Store::new(Retention::default(), 10_000);
        let mut clicks = Vec::new();
        for (i, (country, campaign, ts)) in [
            (*b"US", 1, T0),
            (*b"US", 1, T0 + 300_000),
            (*b"FR", 1, T0),
            (*b"FR", 2, T0),
            (*b"DE", 1, T0 + 3_600_000),
        ]
        .into_iter()
        .enumerate()
        {
            let mut c = click(campaign, ts, 10, &format!("u{i}"), 1 + i as u64);
            c.country = country;
            clicks.push(c);
        }
        apply(&mut s, &frame_bytes(&clicks, 1, 0, 1), NOW);
        let got = |from: u64, to: u64| -> Vec<(Dim, u64, u64)> {
            s.breakdown(1, Window::M5, Dim::KIND_COUNTRY, from, to)
                .into_iter()
                .map(|(d, c)| (d, c.clicks, c.cost_micros))
                .collect()
        };
        assert_eq!(
            got(T0, T0 + 600_000),
            vec![
                (Dim::Country(*b"US"), 2, 1 + 2),
                (Dim::Country(*b"FR"), 1, 3)
            ]
        );
        assert_eq!(got(T0 + 300_000, u64::MAX).len(), 2); // US (2nd bucket) and DE
        assert!(got(T0, T0).is_empty());
        let devices = s.breakdown(1, Window::D1, Dim::KIND_DEVICE, 0, u64::MAX);
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].1.clicks, 4);
    }

    #[test]
    fn owners_come_from_frames_survive_snapshots_and_go_with_their_cells() {
        let r = Retention {
            m5_ms: 600_000,
            h1_ms: 600_000,
            d1_ms: 600_000,
        };
        let mut s = Store::new(r, 1_000);
        let mut a = click(1, T0, 10, "a", 5);
        a.advertiser_id = 100;
        let mut b = click(2, T0 + 86_400_000, 11, "b", 5);
        b.advertiser_id = 200;
        apply(&mut s, &frame_bytes(&[a, b.clone()], 1, 0, 1), T0);
        assert_eq!(
            (s.owner(1), s.owner(2), s.owner(3)),
            (Some(100), Some(200), None)
        );
        assert_eq!(s.campaigns(Some(200)), vec![(2, 200)]);
        assert_eq!(s.campaigns(None), vec![(1, 100), (2, 200)]);
        let mut t = Store::new(r, 1_000);
        for c in &s.to_chunks() {
            let mut buf = Vec::new();
            encode_store_chunk(c, &mut buf).unwrap();
            let (body, _) = split_frame(&buf, FRAME_BYTES_MAX).unwrap().unwrap();
            t.load_chunk(access_store_chunk(&body).unwrap(), T0)
                .unwrap();
        }
        assert_eq!(t.campaigns(None), s.campaigns(None));
        s.evict(T0 + 2 * 86_400_000);
        assert_eq!(s.campaigns(None), vec![(2, 200)]);
    }
}
