//! Tumbling windows on event time, aligned to UTC (docs/api.md).
//!
//! A bucket is `[start, start + len)` with `start` a multiple of the window length since
//! the Unix epoch. Every length divides the next (5 min | 1 h | 1 d), so a 5m bucket lies
//! inside exactly one 1h bucket and one 1d bucket: that is what lets the controlplane roll
//! fine buckets up into coarse ones instead of the dataplane counting each window apart.

use std::fmt;

/// A window length of the query API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Window {
    M5 = 0,
    H1 = 1,
    D1 = 2,
}

const MINUTE_MS: u64 = 60_000;

impl Window {
    /// Finest first.
    pub const ALL: [Window; 3] = [Window::M5, Window::H1, Window::D1];

    pub fn parse(s: &str) -> Option<Window> {
        Some(match s {
            "5m" => Window::M5,
            "1h" => Window::H1,
            "1d" => Window::D1,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Window::M5 => "5m",
            Window::H1 => "1h",
            Window::D1 => "1d",
        }
    }

    pub const fn len_ms(self) -> u64 {
        match self {
            Window::M5 => 5 * MINUTE_MS,
            Window::H1 => 60 * MINUTE_MS,
            Window::D1 => 24 * 60 * MINUTE_MS,
        }
    }

    pub fn from_u8(v: u8) -> Option<Window> {
        Window::ALL.get(v as usize).copied()
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Start of the bucket that contains `ts_ms`.
    #[inline]
    pub const fn bucket_start(self, ts_ms: u64) -> u64 {
        ts_ms - ts_ms % self.len_ms()
    }

    /// This window and every coarser one, finest first: the windows a count in a bucket
    /// of `self` also belongs to.
    pub fn self_and_coarser(self) -> &'static [Window] {
        &Window::ALL[self as usize..]
    }

    /// Starts of the buckets whose start lies in `[from_ms, to_ms)`, ascending.
    pub fn bucket_starts(self, from_ms: u64, to_ms: u64) -> impl Iterator<Item = u64> {
        let len = self.len_ms();
        let first = from_ms.div_ceil(len).saturating_mul(len);
        (0..self.bucket_count(from_ms, to_ms)).map(move |i| first + i * len)
    }

    /// How many bucket starts lie in `[from_ms, to_ms)`.
    pub fn bucket_count(self, from_ms: u64, to_ms: u64) -> u64 {
        if to_ms <= from_ms {
            return 0;
        }
        let len = self.len_ms();
        // Multiples of len in [from, to) = ceil(to/len) - ceil(from/len).
        to_ms.div_ceil(len) - from_ms.div_ceil(len)
    }
}

// Rolling up relies on each length dividing the next.
const _: () =
    assert!(Window::H1.len_ms() / Window::M5.len_ms() * Window::M5.len_ms() == Window::H1.len_ms());
const _: () =
    assert!(Window::D1.len_ms() / Window::H1.len_ms() * Window::H1.len_ms() == Window::D1.len_ms());

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints() {
        for w in Window::ALL {
            assert_eq!(Window::parse(w.as_str()), Some(w));
            assert_eq!(Window::from_u8(w.as_u8()), Some(w));
        }
        for bad in ["", "5M", "1m", "60m", "1w", " 5m"] {
            assert_eq!(Window::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Window::from_u8(3), None);
    }

    #[test]
    fn known_buckets() {
        // 2025-11-27T00:00:00.123Z
        let ts = 1_764_201_600_123;
        assert_eq!(Window::M5.bucket_start(ts), 1_764_201_600_000);
        assert_eq!(Window::H1.bucket_start(ts), 1_764_201_600_000);
        assert_eq!(Window::D1.bucket_start(ts), 1_764_201_600_000);
        assert_eq!(
            Window::M5.bucket_start(ts - 124),
            1_764_201_600_000 - 300_000
        );
        assert_eq!(
            Window::H1.bucket_start(ts - 124),
            1_764_201_600_000 - 3_600_000
        );
    }

    #[test]
    fn bucket_ranges() {
        let w = Window::M5;
        let l = w.len_ms();
        let check = |from: u64, to: u64, want: &[u64]| {
            let got: Vec<u64> = w.bucket_starts(from, to).collect();
            assert_eq!(got, want, "[{from}, {to})");
            assert_eq!(w.bucket_count(from, to), want.len() as u64);
        };
        check(0, 0, &[]);
        check(0, 1, &[0]);
        check(1, l, &[]);
        check(1, l + 1, &[l]);
        check(l, 3 * l, &[l, 2 * l]);
        check(3 * l, l, &[]);
    }

    proptest! {
        #[test]
        fn bucket_contains_ts_and_is_aligned(ts in 0u64..u64::MAX / 2, w in 0u8..3) {
            let w = Window::from_u8(w).unwrap();
            let s = w.bucket_start(ts);
            prop_assert!(s <= ts && ts < s + w.len_ms());
            prop_assert_eq!(s % w.len_ms(), 0);
            prop_assert_eq!(w.bucket_start(s), s);
            for &c in w.self_and_coarser() {
                // The coarser bucket of ts contains this whole bucket.
                let cs = c.bucket_start(ts);
                prop_assert!(cs <= s && s + w.len_ms() <= cs + c.len_ms());
                prop_assert_eq!(c.bucket_start(s), cs);
            }
        }

        #[test]
        fn range_iteration_matches_definition(from in 0u64..10_000_000, span in 0u64..5_000_000) {
            let to = from + span;
            let w = Window::M5;
            let got: Vec<u64> = w.bucket_starts(from, to).collect();
            prop_assert_eq!(got.len() as u64, w.bucket_count(from, to));
            for (i, s) in got.iter().enumerate() {
                prop_assert!(from <= *s && *s < to);
                prop_assert_eq!(s % w.len_ms(), 0);
                if i > 0 { prop_assert_eq!(s - got[i - 1], w.len_ms()); }
            }
            // No aligned start just outside the range was missed.
            if let Some(first) = got.first() { prop_assert!(*first < from + w.len_ms()); }
            if let Some(last) = got.last() { prop_assert!(last + w.len_ms() >= to); }
        }
    }
}
