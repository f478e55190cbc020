//! Bloom filters for dedup on `event_id` (docs/api.md: a retry within the window is a
//! duplicate).
//!
//! `BloomFilter` is the textbook filter: k probes anywhere in the table, by double hashing
//! (Kirsch–Mitzenmacher) from the low 32 bits of the hash plus a full remix of it.
//!
//! `RotatingBloom` is a blocked filter (Putze, Sanders and Singler, 2007): a remix of the
//! hash picks one 64-byte block and all k bits of an item live in it, and the G generations
//! of a block index are adjacent, so a check-and-insert reads G adjacent cache lines (one
//! burst, whatever k) instead of k random lines. It pays ~13% more bits than the textbook
//! filter for the same false-positive rate, and one word per block for an epoch stamp that
//! makes rotation free: an expired generation is never cleared in one pass, each of its
//! blocks is zeroed when first written again.
//!
//! Neither uses the top 32 bits of the hash raw: they pick the owning core
//! (`hash::shard_for`), so within one shard they are anything but uniform.

use std::f64::consts::LN_2;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::hash::mix64;

/// More probes than this buy little (and cost a cache miss each in `BloomFilter`).
const HASHES_MAX: u32 = 32;
/// At most this many generations: a check reads one cache line per generation.
const GENERATIONS_MAX: u32 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BloomParams {
    pub bits: u64,
    pub hashes: u32,
}

/// Optimal size for `expected_items` at false-positive rate `fp_rate`. Bits are rounded
/// up to whole 64-bit words; a rate outside (0, 0.5] is clamped into it.
pub fn bloom_params(expected_items: u64, fp_rate: f64) -> BloomParams {
    let n = expected_items.max(1) as f64;
    let p = if fp_rate.is_nan() {
        0.001
    } else {
        fp_rate.clamp(1e-15, 0.5)
    };
    let ideal_bits = (-n * p.ln() / (LN_2 * LN_2)).ceil();
    let bits = ((ideal_bits as u64).max(64)).div_ceil(64) * 64;
    let hashes = ((ideal_bits / n) * LN_2)
        .round()
        .clamp(1.0, HASHES_MAX as f64) as u32;
    BloomParams { bits, hashes }
}

/// The double-hashing pair for `h`: probe `i` is `fastrange(a + i * b, bits)`.
#[inline]
fn probe_pair(h: u64) -> (u64, u64) {
    let x = mix64(h ^ 0x9e37_79b9_7f4a_7c15);
    // Multiply-high range reduction reads the top bits of `a + i*b`, so both need
    // well-mixed top halves: `x`'s two halves, never `h`'s own top bits.
    let a = (x & 0xffff_ffff_0000_0000) | (h & 0xffff_ffff);
    let b = x.rotate_left(32) | 1;
    (a, b)
}

#[inline]
fn probe(a: u64, b: u64, i: u32, bits: u64) -> u64 {
    let v = a.wrapping_add((i as u64).wrapping_mul(b));
    ((v as u128 * bits as u128) >> 64) as u64
}

/// A plain Bloom filter over 64-bit hashes.
#[derive(Clone, Debug)]
pub struct BloomFilter {
    words: Vec<u64>,
    bits: u64,
    hashes: u32,
}

impl BloomFilter {
    pub fn new(p: BloomParams) -> Self {
        let words = p.bits.max(64).div_ceil(64);
        BloomFilter {
            words: vec![0; words as usize],
            bits: words * 64,
            hashes: p.hashes.clamp(1, HASHES_MAX),
        }
    }

    #[inline]
    pub fn insert(&mut self, h: u64) {
        let (a, b) = probe_pair(h);
        for i in 0..self.hashes {
            let bit = probe(a, b, i, self.bits);
            self.words[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
    }

    #[inline]
    pub fn contains(&self, h: u64) -> bool {
        let (a, b) = probe_pair(h);
        (0..self.hashes).all(|i| {
            let bit = probe(a, b, i, self.bits);
            self.words[(bit >> 6) as usize] & (1 << (bit & 63)) != 0
        })
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    pub fn memory_bytes(&self) -> u64 {
        self.words.len() as u64 * 8
    }
}

/// Data words per block of a `RotatingBloom`; the block's eighth word is its epoch stamp.
const BLOCK_DATA_WORDS: usize = 7;
const BLOCK_DATA_BITS: u64 = BLOCK_DATA_WORDS as u64 * 64;

/// One cache line: 448 filter bits and the epoch they were written in.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct Block {
    data: [u64; BLOCK_DATA_WORDS],
    /// `now_ms / span_ms` when `data` was last written (zeroed then, if older).
    epoch: u64,
}

const _: () = assert!(std::mem::size_of::<Block>() == 64);
const _: () = assert!(
    BLOCK_DATA_BITS <= 1 << 16,
    "positions come from 16-bit chunks"
);

/// False-positive rate of a blocked filter holding `bits_per_item` data bits per item with
/// `hashes` bits per item: a block's load is Poisson with mean B / bits_per_item, and in a
/// block holding `i` items a bit is set with probability 1 - (1 - 1/B)^(k i) (Putze,
/// Sanders and Singler, "Cache-, hash- and space-efficient Bloom filters", 2007).
#[cfg(test)]
fn blocked_fp_rate(bits_per_item: f64, hashes: u32) -> f64 {
    blocked_fp_rate_for(bits_per_item, hashes, BLOCK_DATA_BITS)
}

fn blocked_fp_rate_for(bits_per_item: f64, hashes: u32, block_bits: u64) -> f64 {
    let b = block_bits as f64;
    let load = b / bits_per_item;
    let ln_clear = (1.0 - 1.0 / b).ln();
    let last = (load + 12.0 * load.sqrt() + 30.0) as u32;
    let mut ln_poisson = -load;
    let mut rate = 0.0;
    for i in 0..=last {
        if i > 0 {
            ln_poisson += load.ln() - (i as f64).ln();
        }
        let set = 1.0 - (ln_clear * (hashes as f64) * (i as f64)).exp();
        rate += ln_poisson.exp() * set.powi(hashes as i32);
    }
    rate
}

/// Data bits per item and hashes for a blocked filter at false-positive rate `p`: for
/// each k near the textbook optimum, the fewest bits that meet `p`, and the k needing the
/// fewest. Blocked filters need 10-20% more bits than the textbook formula at 0.01-0.1%.
fn blocked_sizing(p: f64) -> (f64, u32) {
    blocked_sizing_for(p, BLOCK_DATA_BITS)
}

fn blocked_sizing_for(p: f64, block_bits: u64) -> (f64, u32) {
    const BITS_PER_ITEM_MAX: f64 = 4096.0;
    let textbook = -p.ln() / (LN_2 * LN_2);
    let k_textbook = (textbook * LN_2).round() as u32;
    let mut best = (BITS_PER_ITEM_MAX, HASHES_MAX);
    for k in k_textbook.saturating_sub(3).max(1)..=(k_textbook + 3).min(HASHES_MAX) {
        // Bracket: the rate falls as bits grow, and blocking never beats the textbook.
        let mut lo = textbook;
        let mut hi = textbook * 1.25 + 1.0;
        while blocked_fp_rate_for(hi, k, block_bits) > p {
            lo = hi;
            hi *= 2.0;
            if hi > BITS_PER_ITEM_MAX {
                break;
            }
        }
        if hi > BITS_PER_ITEM_MAX {
            continue;
        }
        while hi - lo > 0.01 {
            let mid = 0.5 * (lo + hi);
            if blocked_fp_rate_for(mid, k, block_bits) <= p {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        if hi < best.0 {
            best = (hi, k);
        }
    }
    best
}

/// Time-rotated generations over a dedup window: an item is remembered for at least
/// `window_ms` (and at most window_ms * G/(G-1)); G generations each cover window/(G-1).
///
/// A blocked filter (see the module comment): block `j` of generation slot `s` lives at
/// `blocks[j * G + s]`, so one check reads G adjacent cache lines. Epoch `e` writes slot
/// `e % G`; a block counts only if its stamp is one of the last G epochs, so an expired
/// generation needs no clearing pass: each block is zeroed when first written again.
#[derive(Clone, Debug)]
pub struct RotatingBloom {
    blocks: Vec<Block>,
    /// Blocks per generation.
    block_count: u64,
    hashes: u32,
    generations: u32,
    /// The slot taking inserts: `epoch % generations`.
    current: u32,
    span_ms: u64,
    /// The latest `now_ms / span_ms` seen (never goes back).
    epoch: u64,
    /// Where the next epoch starts: checked instead of dividing on every call.
    next_epoch_ms: u64,
    items_per_window: u64,
    /// Blocks zeroed so far (each on its first write in a new epoch).
    cleared_blocks: u64,
}

impl RotatingBloom {
    /// `items_per_window`: how many items this shard must hold over one window.
    /// Each generation is sized so the combined false-positive rate over all G checked
    /// generations is <= fp_rate. `generations` is clamped to 2..=32.
    pub fn new(
        window_ms: u64,
        generations: u32,
        items_per_window: u64,
        fp_rate: f64,
        now_ms: u64,
    ) -> Self {
        let g = generations.clamp(2, GENERATIONS_MAX);
        // Rounded up so that G-1 spans cover at least the whole window.
        let span_ms = window_ms.div_ceil(g as u64 - 1).max(1);
        let per_generation = items_per_window.div_ceil(g as u64 - 1).max(1);
        let p = if fp_rate.is_nan() {
            0.001
        } else {
            fp_rate.clamp(1e-15, 0.5)
        };
        // A fresh item is a false positive if any of the G generations says yes.
        let p_generation = 1.0 - (1.0 - p).powf(1.0 / g as f64);
        let (bits_per_item, hashes) = blocked_sizing(p_generation);
        let block_count =
            ((per_generation as f64 * bits_per_item / BLOCK_DATA_BITS as f64).ceil() as u64).max(1);
        let epoch = now_ms / span_ms;
        RotatingBloom {
            blocks: vec![Block::default(); (block_count * g as u64) as usize],
            block_count,
            hashes,
            generations: g,
            current: (epoch % g as u64) as u32,
            span_ms,
            epoch,
            next_epoch_ms: (epoch + 1).saturating_mul(span_ms),
            items_per_window: items_per_window.max(1),
            cleared_blocks: 0,
        }
    }

    /// true when `hash` was (probably) seen within the window; inserts it either way
    /// (into the current generation). A clock that goes backwards never rotates.
    #[inline]
    pub fn check_and_insert(&mut self, hash: u64, now_ms: u64) -> bool {
        if now_ms >= self.next_epoch_ms {
            self.advance(now_ms);
        }
        let (block, mask) = self.block_and_mask(hash);
        let g = self.generations as usize;
        let group = &mut self.blocks[block * g..block * g + g];
        // Every generation is read before the current one is written, so the item cannot
        // vouch for itself. Branch-free: the lines are in flight together.
        let mut seen = false;
        for b in group.iter() {
            let mut missing = 0;
            for (d, m) in b.data.iter().zip(&mask) {
                missing |= m & !d;
            }
            let live = self.epoch.wrapping_sub(b.epoch) < g as u64;
            seen |= (missing == 0) & live;
        }
        let cur = &mut group[self.current as usize];
        if cur.epoch != self.epoch {
            cur.data = [0; BLOCK_DATA_WORDS];
            cur.epoch = self.epoch;
            self.cleared_blocks += 1;
        }
        for (d, m) in cur.data.iter_mut().zip(&mask) {
            *d |= m;
        }
        seen
    }

    /// Moves to the epoch holding `now_ms`: nothing to clear, stale blocks read as empty.
    #[cold]
    fn advance(&mut self, now_ms: u64) {
        self.epoch = now_ms / self.span_ms;
        self.current = (self.epoch % self.generations as u64) as u32;
        self.next_epoch_ms = (self.epoch + 1).saturating_mul(self.span_ms);
    }

    /// The block index and the item's k bits within a block. The block comes from the top
    /// bits of one remix of the hash; the bit positions from 16-bit chunks (four per word,
    /// each range-reduced to 0..448) of further words, splitmix64-style outputs of that
    /// remix, which are independent of each other and so computed in parallel.
    #[inline]
    fn block_and_mask(&self, hash: u64) -> (usize, [u64; BLOCK_DATA_WORDS]) {
        const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
        let x = mix64(hash ^ GOLDEN);
        let block = ((x as u128 * self.block_count as u128) >> 64) as usize;
        let mut mask = [0u64; BLOCK_DATA_WORDS];
        let mut left = self.hashes;
        let mut word = 0u64;
        while left > 0 {
            word += 1;
            let chunks = mix64(x.wrapping_add(word.wrapping_mul(GOLDEN)));
            for c in 0..left.min(4) {
                let pos = (((chunks >> (16 * c)) & 0xffff) * BLOCK_DATA_BITS) >> 16;
                mask[(pos >> 6) as usize] |= 1 << (pos & 63);
            }
            left = left.saturating_sub(4);
        }
        (block, mask)
    }

    /// Everything allocated, epoch stamps included.
    pub fn memory_bytes(&self) -> u64 {
        self.blocks.len() as u64 * std::mem::size_of::<Block>() as u64
    }

    /// Total bits (epoch stamps included) / items_per_window.
    pub fn bits_per_event(&self) -> f64 {
        (self.memory_bytes() * 8) as f64 / self.items_per_window as f64
    }

    pub fn generations(&self) -> u32 {
        self.generations
    }

    pub fn hashes(&self) -> u32 {
        self.hashes
    }
}

/// Filter bits per block of a [`SharedBloom`]: a whole cache line, no stamp word.
const SHARED_BLOCK_WORDS: usize = 8;
const SHARED_BLOCK_BITS: u64 = SHARED_BLOCK_WORDS as u64 * 64;
/// Blocks zeroed per step of a generation clear (64 KiB: a few µs).
pub const CLEAR_CHUNK_BLOCKS: u64 = 1024;
/// A slot being zeroed.
const SLOT_CLEARING: u64 = u64::MAX;
/// A slot never written.
const SLOT_EMPTY: u64 = u64::MAX - 1;
/// Spins before a waiting thread yields its CPU.
const SPINS_BEFORE_YIELD: u32 = 64;

#[repr(C, align(64))]
struct SharedBlock {
    data: [AtomicU64; SHARED_BLOCK_WORDS],
}

const _: () = assert!(std::mem::size_of::<SharedBlock>() == 64);

/// One box-wide dedup filter shared by every core: the same blocked, time-rotated design
/// as [`RotatingBloom`], taking `&self` so every core checks and inserts in place (plain
/// loads to check, one `fetch_or` per written word to insert) instead of sending the id
/// to an owner core and waiting for its answer.
///
/// G live generations plus one spare slot: while epoch `e` takes inserts, the slot of
/// `e + 1` (which held the expired epoch `e - G`) is zeroed ahead of time by one core in
/// small steps ([`SharedBloom::clear_ahead_step`]), so a boundary costs no pass on the
/// request path. Whoever needs a slot that is still being cleared helps finish it, chunk
/// by chunk; nobody waits on a thread that is not running.
///
/// Two copies of one id checked on two cores within the same few nanoseconds (both
/// reading before either writes) can both pass; billing dedups exactly.
pub struct SharedBloom {
    blocks: Box<[SharedBlock]>,
    /// Blocks per generation.
    block_count: u64,
    hashes: u32,
    /// Live generations (G); the table has G + 1 slots.
    generations: u32,
    span_ms: u64,
    items_per_window: u64,
    /// The latest epoch any core has seen (never goes back).
    epoch: AtomicU64,
    /// Per slot: the epoch whose items it holds, `SLOT_CLEARING` or `SLOT_EMPTY`.
    slot_epoch: Box<[AtomicU64]>,
    /// Per slot, while clearing: (epoch tag << 32) | next chunk to claim.
    cursor: Box<[AtomicU64]>,
    /// Per slot, while clearing: (epoch tag << 32) | chunks zeroed.
    done: Box<[AtomicU64]>,
    cleared_chunks: AtomicU64,
}

/// What one request checks against: taken once per request (`SharedBloom::view`).
#[derive(Clone, Copy, Debug)]
pub struct BloomView {
    /// Bit s set: slot s holds a live generation.
    live: u32,
    /// The slot taking inserts.
    current: u32,
}

fn tag(epoch: u64) -> u64 {
    (epoch & 0xffff_ffff) << 32
}

impl SharedBloom {
    /// As [`RotatingBloom::new`]; `items_per_window` is the whole box's.
    pub fn new(
        window_ms: u64,
        generations: u32,
        items_per_window: u64,
        fp_rate: f64,
        now_ms: u64,
    ) -> Self {
        let g = generations.clamp(2, GENERATIONS_MAX - 1);
        let span_ms = window_ms.div_ceil(g as u64 - 1).max(1);
        let per_generation = items_per_window.div_ceil(g as u64 - 1).max(1);
        let p = if fp_rate.is_nan() {
            0.001
        } else {
            fp_rate.clamp(1e-15, 0.5)
        };
        let p_generation = 1.0 - (1.0 - p).powf(1.0 / g as f64);
        let (bits_per_item, hashes) = blocked_sizing_for(p_generation, SHARED_BLOCK_BITS);
        let block_count =
            ((per_generation as f64 * bits_per_item / SHARED_BLOCK_BITS as f64).ceil() as u64)
                .max(1);
        let slots = g as usize + 1;
        let blocks = (0..block_count as usize * slots)
            .map(|_| SharedBlock {
                data: Default::default(),
            })
            .collect();
        let epoch = now_ms / span_ms;
        let slot_epoch: Box<[AtomicU64]> = (0..slots).map(|_| AtomicU64::new(SLOT_EMPTY)).collect();
        // The starting epoch's slot is zero already.
        slot_epoch[(epoch % slots as u64) as usize].store(epoch, Ordering::Relaxed);
        SharedBloom {
            blocks,
            block_count,
            hashes,
            generations: g,
            span_ms,
            items_per_window: items_per_window.max(1),
            epoch: AtomicU64::new(epoch),
            slot_epoch,
            cursor: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            done: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            cleared_chunks: AtomicU64::new(0),
        }
    }

    fn slots(&self) -> u64 {
        self.generations as u64 + 1
    }

    fn chunks(&self) -> u64 {
        self.block_count.div_ceil(CLEAR_CHUNK_BLOCKS)
    }

    /// The generations live at `now_ms`, the current one ready for inserts. Normally a
    /// division and G + 1 loads; at a boundary not cleared ahead, helps clear its slot.
    pub fn view(&self, now_ms: u64) -> BloomView {
        let mut e = now_ms / self.span_ms;
        let known = self.epoch.load(Ordering::Relaxed);
        if e > known {
            self.epoch.fetch_max(e, Ordering::Relaxed);
        } else {
            e = known;
        }
        let slots = self.slots();
        let current = (e % slots) as usize;
        if self.slot_epoch[current].load(Ordering::Acquire) != e {
            self.prepare(e);
        }
        let mut live = 0u32;
        for (s, at) in self.slot_epoch.iter().enumerate() {
            let ep = at.load(Ordering::Acquire);
            if ep <= e && e - ep < self.generations as u64 {
                live |= 1 << s;
            }
        }
        BloomView {
            live,
            current: current as u32,
        }
    }

    /// true when `hash` was (probably) seen within the window; inserts it either way.
    #[inline]
    pub fn check_and_insert(&self, view: &BloomView, hash: u64) -> bool {
        let (block, mask) = self.block_and_mask(hash);
        let slots = self.slots() as usize;
        let group = &self.blocks[block * slots..block * slots + slots];
        let mut seen = false;
        for (s, b) in group.iter().enumerate() {
            let mut missing = 0;
            for (d, m) in b.data.iter().zip(&mask) {
                missing |= m & !d.load(Ordering::Relaxed);
            }
            seen |= (missing == 0) & (view.live & (1 << s) != 0);
        }
        let cur = &group[view.current as usize];
        for (d, &m) in cur.data.iter().zip(&mask) {
            // Only words missing a bit are written: a repeat writes nothing.
            if m != 0 && d.load(Ordering::Relaxed) & m != m {
                d.fetch_or(m, Ordering::Relaxed);
            }
        }
        seen
    }

    /// One step of clearing ahead: zeroes up to `chunks` chunks of the slot the next
    /// epoch will write. true when that slot is ready (nothing left to do until the next
    /// boundary). One core calls it regularly; any core may.
    pub fn clear_ahead_step(&self, now_ms: u64, chunks: u64) -> bool {
        let e = (now_ms / self.span_ms).max(self.epoch.load(Ordering::Relaxed));
        // The current slot first (if the boundary came before the clear finished).
        for target in [e, e + 1] {
            let s = (target % self.slots()) as usize;
            let at = self.slot_epoch[s].load(Ordering::Acquire);
            if at == target {
                continue;
            }
            if at == SLOT_CLEARING {
                if self.cursor[s].load(Ordering::Acquire) >> 32 != target & 0xffff_ffff {
                    // Someone clears it toward another epoch: theirs to finish.
                    return false;
                }
            } else if !self.start_clear(s, at, target) {
                return false;
            }
            for _ in 0..chunks.max(1) {
                if !self.clear_one_chunk(s, target) {
                    break;
                }
            }
            return self.slot_epoch[s].load(Ordering::Acquire) == target;
        }
        true
    }

    /// Makes the slot of epoch `e` ready, helping whoever clears it.
    #[cold]
    fn prepare(&self, e: u64) {
        let s = (e % self.slots()) as usize;
        let mut spins = 0u32;
        loop {
            let at = self.slot_epoch[s].load(Ordering::Acquire);
            if at == e {
                return;
            }
            if at != SLOT_CLEARING {
                self.start_clear(s, at, e);
                continue;
            }
            if self.cursor[s].load(Ordering::Acquire) >> 32 == e & 0xffff_ffff
                && self.clear_one_chunk(s, e)
            {
                continue;
            }
            // Being cleared for another epoch (or all chunks claimed): wait for it.
            spins += 1;
            if spins.is_multiple_of(SPINS_BEFORE_YIELD) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            if self.slot_epoch[s].load(Ordering::Acquire) == SLOT_CLEARING && spins > 1_000_000 {
                // A clearer for another epoch vanished mid-way (it cannot: every claimed
                // chunk is finished by whoever claimed it). Bounded anyway.
                return;
            }
        }
    }

    /// Claims slot `s` (seen holding `at`) for clearing toward `target`. false if someone
    /// else changed it first.
    fn start_clear(&self, s: usize, at: u64, target: u64) -> bool {
        if self.slot_epoch[s]
            .compare_exchange(at, SLOT_CLEARING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        self.done[s].store(tag(target), Ordering::Release);
        self.cursor[s].store(tag(target), Ordering::Release);
        true
    }

    /// Claims and zeroes one chunk of slot `s` being cleared toward `target`; the one
    /// finishing the last chunk marks the slot ready. false when no chunk was left.
    fn clear_one_chunk(&self, s: usize, target: u64) -> bool {
        let n = self.chunks();
        let c = self.cursor[s].load(Ordering::Acquire);
        if c >> 32 != target & 0xffff_ffff || c & 0xffff_ffff >= n {
            return false;
        }
        if self.cursor[s]
            .compare_exchange(c, c + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return true;
        }
        let chunk = c & 0xffff_ffff;
        let slots = self.slots() as usize;
        let from = chunk * CLEAR_CHUNK_BLOCKS;
        let to = (from + CLEAR_CHUNK_BLOCKS).min(self.block_count);
        for j in from as usize..to as usize {
            for d in &self.blocks[j * slots + s].data {
                d.store(0, Ordering::Relaxed);
            }
        }
        self.cleared_chunks.fetch_add(1, Ordering::Relaxed);
        if self.done[s].fetch_add(1, Ordering::AcqRel) + 1 == tag(target) + n {
            self.slot_epoch[s].store(target, Ordering::Release);
        }
        true
    }

    #[inline]
    fn block_and_mask(&self, hash: u64) -> (usize, [u64; SHARED_BLOCK_WORDS]) {
        const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
        let x = mix64(hash ^ GOLDEN);
        let block = ((x as u128 * self.block_count as u128) >> 64) as usize;
        let mut mask = [0u64; SHARED_BLOCK_WORDS];
        let mut left = self.hashes;
        let mut word = 0u64;
        while left > 0 {
            word += 1;
            let chunks = mix64(x.wrapping_add(word.wrapping_mul(GOLDEN)));
            for c in 0..left.min(4) {
                // 9 of each 16-bit chunk: a position in 0..512.
                let pos = (chunks >> (16 * c)) & (SHARED_BLOCK_BITS - 1);
                mask[(pos >> 6) as usize] |= 1 << (pos & 63);
            }
            left = left.saturating_sub(4);
        }
        (block, mask)
    }

    /// Everything allocated (G + 1 slots).
    pub fn memory_bytes(&self) -> u64 {
        self.blocks.len() as u64 * std::mem::size_of::<SharedBlock>() as u64
    }

    /// Total bits / items_per_window (the whole box's).
    pub fn bits_per_event(&self) -> f64 {
        (self.memory_bytes() * 8) as f64 / self.items_per_window as f64
    }

    pub fn generations(&self) -> u32 {
        self.generations
    }

    pub fn hashes(&self) -> u32 {
        self.hashes
    }

    /// Chunks zeroed since creation (each `CLEAR_CHUNK_BLOCKS` blocks).
    pub fn cleared_chunks(&self) -> u64 {
        self.cleared_chunks.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_textbook_formulas() {
        let p = bloom_params(10_000_000, 0.001);
        // 1.44 * log2(1000) ≈ 14.38 bits per item, k ≈ 10.
        assert!((143_700_000..=143_900_000).contains(&p.bits), "{p:?}");
        assert_eq!(p.bits % 64, 0);
        assert_eq!(p.hashes, 10);
        let tiny = bloom_params(0, 0.5);
        assert_eq!(
            tiny,
            BloomParams {
                bits: 64,
                hashes: 1
            }
        );
        let silly = bloom_params(10, f64::NAN);
        assert!(silly.bits >= 64 && silly.hashes >= 1);
        assert!(bloom_params(10, 0.0).hashes <= HASHES_MAX);
    }

    /// Hashes of one shard out of `shards`: top bits confined to a narrow range, as
    /// `shard_for` leaves them.
    fn shard_hashes(seed: u64, shards: u64) -> impl Iterator<Item = u64> {
        debug_assert!(shards.is_power_of_two());
        (0u64..).map(move |i| {
            mix64(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i) >> shards.trailing_zeros()
        })
    }

    #[test]
    fn plain_filter_meets_its_rate_at_design_load() {
        for shards in [1, 2, 256] {
            let n = 100_000;
            let target = 0.001;
            let mut f = BloomFilter::new(bloom_params(n, target));
            let mut hashes = shard_hashes(7 + shards, shards);
            for h in hashes.by_ref().take(n as usize) {
                f.insert(h);
            }
            let probes = 1_000_000;
            let fp = hashes.take(probes).filter(|&h| f.contains(h)).count();
            let rate = fp as f64 / probes as f64;
            assert!(rate <= 1.5 * target, "shards {shards}: {rate}");
            assert!(
                rate >= 0.3 * target,
                "suspiciously low, shards {shards}: {rate}"
            );
        }
    }

    #[test]
    fn plain_filter_has_no_false_negatives_and_clears() {
        let mut f = BloomFilter::new(bloom_params(1_000, 0.01));
        for i in 0..1_000u64 {
            f.insert(mix64(i));
        }
        assert!((0..1_000u64).all(|i| f.contains(mix64(i))));
        f.clear();
        assert!((0..1_000u64).all(|i| !f.contains(mix64(i))));
        assert_eq!(f.memory_bytes() * 8, bloom_params(1_000, 0.01).bits);
    }

    #[test]
    fn rotating_filter_meets_its_rate_at_design_load() {
        // Every hash is distinct, so every "seen" is a false positive.
        for (generations, shards) in [(2, 1), (4, 2), (8, 256)] {
            let window_ms = 1_000;
            let per_window = 60_000u64;
            let target = 0.01;
            let mut f = RotatingBloom::new(window_ms, generations, per_window, target, 0);
            let per_ms = per_window / window_ms;
            let mut hashes = shard_hashes(99 + generations as u64, shards);
            let (mut fp, mut measured) = (0u64, 0u64);
            for ms in 0..5 * window_ms {
                for h in hashes.by_ref().take(per_ms as usize) {
                    let seen = f.check_and_insert(h, ms);
                    // Steady state only: after one full window.
                    if ms >= 2 * window_ms {
                        measured += 1;
                        fp += seen as u64;
                    }
                }
            }
            let rate = fp as f64 / measured as f64;
            assert!(rate <= 1.5 * target, "G={generations}: {rate}");
        }
    }

    #[test]
    fn remembers_for_the_window_and_forgets_after() {
        let window_ms = 1_000u64;
        for generations in [2u32, 3, 4, 7] {
            let span = window_ms.div_ceil(generations as u64 - 1);
            let forget_ms = span * generations as u64;
            assert!(
                forget_ms
                    <= window_ms * generations as u64 / (generations as u64 - 1)
                        + generations as u64
            );
            for start in [0u64, 1, 333, 500, 999, 123_456] {
                for delay in [0, 1, window_ms / 2, window_ms - 1, window_ms] {
                    let mut f = RotatingBloom::new(window_ms, generations, 1_000, 0.001, start);
                    assert!(!f.check_and_insert(42, start));
                    assert!(
                        f.check_and_insert(42, start + delay),
                        "G={generations} remembered {delay}"
                    );
                }
                for delay in [forget_ms, forget_ms + 1, 10 * window_ms] {
                    let mut f = RotatingBloom::new(window_ms, generations, 1_000, 0.001, start);
                    assert!(!f.check_and_insert(42, start));
                    assert!(
                        !f.check_and_insert(42, start + delay),
                        "G={generations} forgot {delay}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_repeat_refreshes_and_the_clock_may_go_back() {
        let mut f = RotatingBloom::new(1_000, 2, 1_000, 0.001, 0);
        assert!(!f.check_and_insert(7, 0));
        assert!(f.check_and_insert(7, 1_500));
        // Inserted again at 1500: still there at 2999 although first seen at 0.
        assert!(f.check_and_insert(7, 2_999));
        assert!(f.check_and_insert(7, 10));
        assert!(!f.check_and_insert(8, u64::MAX));
        assert!(!f.check_and_insert(7, u64::MAX));
    }

    #[test]
    fn reports_its_size() {
        let f = RotatingBloom::new(60_000, 4, 10_000_000, 0.001, 0);
        assert_eq!(f.generations(), 4);
        let bpe = f.bits_per_event();
        // 4/3 generations' worth of items at 0.025% each: blocked, ≈ 19.5 data bits per
        // item (the textbook filter would need 17.3), plus one stamp word in eight:
        // ≈ 4/3 * 19.5 * 8/7 = 29.7 bits.
        assert!((28.5..=31.0).contains(&bpe), "{bpe}");
        assert_eq!(f.hashes(), 11);
        assert_eq!(f.memory_bytes() * 8, (bpe * 10_000_000.0).round() as u64);
        assert_eq!(f.memory_bytes() % 64, 0);
    }

    #[test]
    fn blocked_sizing_costs_a_little_more_than_the_textbook() {
        for p in [0.01, 0.001, 0.000_25, 1e-6] {
            let (bits, k) = blocked_sizing(p);
            let textbook = -p.ln() / (LN_2 * LN_2);
            assert!(
                bits >= textbook && bits <= 1.4 * textbook,
                "p {p}: {bits} k {k}"
            );
            assert!(blocked_fp_rate(bits, k) <= p);
        }
        // Silly rates still give a usable filter.
        let (bits, k) = blocked_sizing(1e-15);
        assert!(bits.is_finite() && (1..=HASHES_MAX).contains(&k));
    }

    /// The rotation stall guard: expiring a generation costs no pass over it, so no call
    /// zeroes more than the one block it writes, at a boundary or after a long silence.
    #[test]
    fn no_call_clears_more_than_one_block() {
        let window_ms = 1_000;
        let mut f = RotatingBloom::new(window_ms, 4, 30_000, 0.001, 0);
        let mut hashes = shard_hashes(5, 2);
        let mut now = 0;
        for step in 0..20_000u64 {
            // Steady load, with a jump over several boundaries now and then.
            now += if step % 5_000 == 4_999 {
                10 * window_ms
            } else {
                1
            };
            for h in hashes.by_ref().take(10) {
                let before = f.cleared_blocks;
                f.check_and_insert(h, now);
                assert!(f.cleared_blocks - before <= 1);
            }
        }
        assert!(f.cleared_blocks > f.block_count, "stale blocks were reused");
    }

    /// Under load, across boundaries: every item is still seen a window after its insert.
    #[test]
    fn remembers_every_item_for_the_window_under_load() {
        for generations in [2u32, 4, 5] {
            let window_ms = 600;
            let mut f = RotatingBloom::new(window_ms, generations, 12_000, 0.01, 7);
            let mut hashes = shard_hashes(11 + generations as u64, 4);
            let per_ms = 20;
            // inserted[(t - 7) * per_ms..][..per_ms]: the items first inserted at t.
            let mut inserted: Vec<u64> = Vec::new();
            for now in 7..7 + 4 * window_ms {
                for h in hashes.by_ref().take(per_ms) {
                    f.check_and_insert(h, now);
                    inserted.push(h);
                }
                // Items inserted exactly one window ago, seen again only now.
                if now >= 7 + window_ms {
                    let at = (now - window_ms - 7) as usize * per_ms;
                    for &h in &inserted[at..at + per_ms] {
                        assert!(f.check_and_insert(h, now), "G={generations} lost {h}");
                    }
                }
            }
        }
    }

    fn shared_hashes(seed: u64) -> impl Iterator<Item = u64> {
        (0u64..).map(move |i| mix64(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i))
    }

    /// Clears everything due at `now` (what the clearing core does in small steps).
    fn settle(f: &SharedBloom, now: u64) {
        while !f.clear_ahead_step(now, 4) {}
    }

    #[test]
    fn shared_filter_meets_its_rate_at_design_load() {
        for generations in [2u32, 4, 8] {
            let window_ms = 1_000;
            let per_window = 60_000u64;
            let target = 0.01;
            let f = SharedBloom::new(window_ms, generations, per_window, target, 0);
            let per_ms = per_window / window_ms;
            let mut hashes = shared_hashes(99 + generations as u64);
            let (mut fp, mut measured) = (0u64, 0u64);
            for ms in 0..5 * window_ms {
                settle(&f, ms);
                let v = f.view(ms);
                for h in hashes.by_ref().take(per_ms as usize) {
                    let seen = f.check_and_insert(&v, h);
                    if ms >= 2 * window_ms {
                        measured += 1;
                        fp += seen as u64;
                    }
                }
            }
            let rate = fp as f64 / measured as f64;
            assert!(rate <= 1.5 * target, "G={generations}: {rate}");
            assert!(
                rate >= 0.1 * target,
                "G={generations}: suspiciously low {rate}"
            );
        }
    }

    #[test]
    fn shared_filter_remembers_for_the_window_and_forgets_after() {
        let window_ms = 1_000u64;
        for generations in [2u32, 3, 4, 7] {
            let span = window_ms.div_ceil(generations as u64 - 1);
            let forget_ms = span * generations as u64;
            for start in [0u64, 1, 333, 999, 123_456] {
                for delay in [0, 1, window_ms / 2, window_ms - 1, window_ms] {
                    let f = SharedBloom::new(window_ms, generations, 1_000, 0.001, start);
                    assert!(!f.check_and_insert(&f.view(start), 42));
                    // With and without the clearing core keeping up.
                    if delay % 2 == 0 {
                        settle(&f, start + delay);
                    }
                    assert!(
                        f.check_and_insert(&f.view(start + delay), 42),
                        "G={generations} remembered {delay}"
                    );
                }
                for delay in [forget_ms, forget_ms + 1, 10 * window_ms] {
                    let f = SharedBloom::new(window_ms, generations, 1_000, 0.001, start);
                    assert!(!f.check_and_insert(&f.view(start), 42));
                    let mut t = start;
                    while t < start + delay {
                        t = (t + span / 2).min(start + delay);
                        settle(&f, t);
                    }
                    assert!(
                        !f.check_and_insert(&f.view(start + delay), 42),
                        "G={generations} forgot {delay}"
                    );
                }
            }
        }
    }

    #[test]
    fn shared_filter_clock_may_go_back() {
        let f = SharedBloom::new(1_000, 2, 1_000, 0.001, 0);
        assert!(!f.check_and_insert(&f.view(0), 7));
        assert!(f.check_and_insert(&f.view(1_500), 7));
        assert!(f.check_and_insert(&f.view(2_999), 7));
        assert!(f.check_and_insert(&f.view(10), 7));
    }

    #[test]
    fn shared_filter_reports_its_size() {
        let f = SharedBloom::new(60_000, 4, 10_000_000, 0.001, 0);
        assert_eq!(f.generations(), 4);
        // 5 slots of 10M/3 items at 0.025% each, ≈ 19.3 bits per item in 512-bit blocks:
        // ≈ 5/3 * 19.3 ≈ 32 bits per event of the window.
        let bpe = f.bits_per_event();
        assert!((30.0..=34.0).contains(&bpe), "{bpe}");
        assert_eq!(f.memory_bytes() % 64, 0);
    }

    /// Every thread inserts its own ids, then every thread checks every other thread's:
    /// all are duplicates whichever thread asks.
    #[test]
    fn shared_filter_catches_duplicates_across_threads() {
        let f = std::sync::Arc::new(SharedBloom::new(60_000, 4, 400_000, 0.001, 0));
        let threads = 4u64;
        let per = 50_000u64;
        let inserted = std::sync::Barrier::new(threads as usize);
        std::thread::scope(|sc| {
            for t in 0..threads {
                let (f, inserted) = (&f, &inserted);
                sc.spawn(move || {
                    let v = f.view(1_000);
                    let mut fresh_seen = 0;
                    for i in 0..per {
                        fresh_seen += f.check_and_insert(&v, mix64(t * per + i)) as u32;
                    }
                    assert!(fresh_seen < 100, "{fresh_seen} false positives");
                    inserted.wait();
                    for i in 0..threads * per {
                        assert!(f.check_and_insert(&v, mix64(i)), "thread {t} missed {i}");
                    }
                });
            }
        });
    }

    /// Clearing a generation is split in steps of a bounded size, and any caller that
    /// needs a slot not yet cleared finishes it.
    #[test]
    fn shared_filter_clears_in_bounded_steps() {
        let window_ms = 3_000;
        let f = SharedBloom::new(window_ms, 4, 3_000_000, 0.001, 0);
        let chunks = f.chunks();
        assert!(chunks > 4, "{chunks}");
        let before = f.cleared_chunks();
        assert!(!f.clear_ahead_step(10, 1));
        assert_eq!(f.cleared_chunks() - before, 1);
        settle(&f, 10);
        assert_eq!(f.cleared_chunks() - before, chunks);
        // Past a boundary with no clearing at all: the first view clears what it needs.
        let v = f.view(5 * window_ms);
        assert!(!f.check_and_insert(&v, 1));
        assert!(f.check_and_insert(&f.view(5 * window_ms), 1));
    }
}
