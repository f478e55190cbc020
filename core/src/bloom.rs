//! Bloom filters for dedup on `event_id` (contract §2: a retry within the window is a
//! duplicate).
//!
//! Indices come from one 64-bit hash by double hashing (Kirsch–Mitzenmacher): the low 32
//! bits of the hash plus a full remix of it. The top 32 bits are never used raw: they
//! pick the owning core (`hash::shard_for`), so within one shard they are anything but
//! uniform.
//!
//! `RotatingBloom` keeps its generations interleaved word by word: probe `i` of an event
//! reads one group of adjacent words holding that bit position in every generation, so a
//! check-and-insert costs `k` cache misses whatever the number of generations.

use std::f64::consts::LN_2;

use crate::hash::mix64;

/// More probes than this buy little and cost a cache miss each.
const HASHES_MAX: u32 = 32;
/// At most this many generations (one bit each in a `u32` survivor mask).
const GENERATIONS_MAX: u32 = 32;
const _: () = assert!(GENERATIONS_MAX <= u32::BITS);

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

/// Time-rotated generations over a dedup window: an item is remembered for at least
/// `window_ms` (and at most window_ms * G/(G-1)); G generations each cover window/(G-1).
///
/// Generation `g` of word `j` lives at `words[j * G + g]`: see the module comment.
#[derive(Clone, Debug)]
pub struct RotatingBloom {
    words: Vec<u64>,
    /// Bits per generation.
    bits: u64,
    hashes: u32,
    generations: u32,
    /// The generation taking inserts.
    current: u32,
    span_ms: u64,
    /// `now_ms / span_ms` when `current` became current.
    epoch: u64,
    items_per_window: u64,
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
        let per_generation = items_per_window.div_ceil(g as u64 - 1);
        let p = if fp_rate.is_nan() {
            0.001
        } else {
            fp_rate.clamp(1e-15, 0.5)
        };
        // A fresh item is a false positive if any of the G generations says yes.
        let p_generation = 1.0 - (1.0 - p).powf(1.0 / g as f64);
        let params = bloom_params(per_generation, p_generation);
        let words_per_generation = params.bits / 64;
        RotatingBloom {
            words: vec![0; (words_per_generation * g as u64) as usize],
            bits: words_per_generation * 64,
            hashes: params.hashes,
            generations: g,
            current: 0,
            span_ms,
            epoch: now_ms / span_ms,
            items_per_window: items_per_window.max(1),
        }
    }

    /// true when `hash` was (probably) seen within the window; inserts it either way
    /// (into the current generation). Rotates first when now_ms has passed the
    /// generation boundary. A clock that goes backwards never rotates.
    #[inline]
    pub fn check_and_insert(&mut self, hash: u64, now_ms: u64) -> bool {
        let epoch = now_ms / self.span_ms;
        if epoch > self.epoch {
            self.rotate(epoch - self.epoch);
            self.epoch = epoch;
        }
        let g = self.generations as usize;
        let cur = self.current as usize;
        let (a, b) = probe_pair(hash);
        // Bit g set: generation g holds every probed bit so far. All probes are read
        // before any is written, so the item cannot vouch for itself.
        let mut survivors = if g == 32 { u32::MAX } else { (1u32 << g) - 1 };
        for i in 0..self.hashes {
            let bit = probe(a, b, i, self.bits);
            let base = (bit >> 6) as usize * g;
            let shift = bit & 63;
            // Branch-free on purpose: a branch on a bit just loaded from DRAM
            // mispredicts half the time and serialises the k misses.
            let mut holders = 0u32;
            for (gen, word) in self.words[base..base + g].iter().enumerate() {
                holders |= (((word >> shift) & 1) as u32) << gen;
            }
            survivors &= holders;
        }
        for i in 0..self.hashes {
            let bit = probe(a, b, i, self.bits);
            self.words[(bit >> 6) as usize * g + cur] |= 1u64 << (bit & 63);
        }
        survivors != 0
    }

    /// Advances `steps` generation boundaries: each one retires the oldest generation,
    /// cleared, as the new current one.
    fn rotate(&mut self, steps: u64) {
        let g = self.generations as usize;
        if steps >= g as u64 {
            self.words.fill(0);
            self.current = (self.current + 1) % self.generations;
            return;
        }
        for _ in 0..steps {
            self.current = (self.current + 1) % self.generations;
            let cur = self.current as usize;
            for word in self.words.iter_mut().skip(cur).step_by(g) {
                *word = 0;
            }
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// Total bits / items_per_window.
    pub fn bits_per_event(&self) -> f64 {
        (self.words.len() as u64 * 64) as f64 / self.items_per_window as f64
    }

    pub fn generations(&self) -> u32 {
        self.generations
    }

    pub fn hashes(&self) -> u32 {
        self.hashes
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
        // 4/3 generations' worth of items at 0.025% each: ≈ 4/3 * 17.2 bits.
        assert!((21.0..=25.0).contains(&bpe), "{bpe}");
        assert_eq!(f.memory_bytes() * 8, (bpe * 10_000_000.0).round() as u64);
    }
}
