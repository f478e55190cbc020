//! Per-address token buckets with bounded memory, one table for the whole box (429 past
//! the limit, whatever core answers).
//!
//! A set-associative table allocated once: an address hashes to one set of `WAYS`
//! slots; a newcomer to a full set evicts the slot seen least recently. An evicted
//! address starts again with a full bucket, so eviction can only ever be lenient, and a
//! flood of spoofed-looking addresses costs a bounded table, never memory growth.
//!
//! Tokens are kept in thousandths so that a refill of `events_per_sec` per 1000 ms is
//! exact integer arithmetic: one millisecond adds `events_per_sec` milli-tokens.

use std::cell::UnsafeCell;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

use crate::hash::mix64;

/// Slots per set: one or two cache lines of 32-byte slots, scanned linearly.
const WAYS: usize = 8;
const MILLI: i64 = 1000;
/// Spins on a busy set before the waiting thread yields its CPU.
const SPINS_BEFORE_YIELD: u32 = 64;

/// A value behind a one-byte spin lock in its own cache line(s): the per-set lock of the
/// box-wide tables (per-address buckets, per-IP minute counters). A holder runs a few
/// dozen instructions and never blocks; a waiter spins, then yields its CPU (so a holder
/// preempted by the kernel gets it back).
#[repr(align(64))]
pub struct SpinCell<T> {
    lock: AtomicBool,
    inner: UnsafeCell<T>,
}

// SAFETY: the inner value is only reached through `with`, under the lock.
unsafe impl<T: Send> Sync for SpinCell<T> {}

struct Unlock<'a>(&'a AtomicBool);

impl Drop for Unlock<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl<T> SpinCell<T> {
    pub fn new(v: T) -> Self {
        SpinCell {
            lock: AtomicBool::new(false),
            inner: UnsafeCell::new(v),
        }
    }

    /// Runs `f` on the value, alone.
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut spins = 0u32;
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.lock.load(Ordering::Relaxed) {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(SPINS_BEFORE_YIELD) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        let _unlock = Unlock(&self.lock);
        // SAFETY: the lock is held until `_unlock` drops, after `f` returns or unwinds.
        f(unsafe { &mut *self.inner.get() })
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    /// The address in IPv6 form (IPv4 as `::ffff:a.b.c.d`), split so the slot stays
    /// 8-byte aligned and 32 bytes long.
    key: [u64; 2],
    /// Milli-tokens; negative while in debt after an oversized batch.
    tokens: i64,
    /// Time of the last refill, which is also when the address was last seen.
    seen_ms: u64,
}

#[derive(Default)]
struct Set {
    slots: [Slot; WAYS],
    /// Bit i marks way i in use.
    occupied: u8,
}

/// Per-address token buckets (events/s) for the whole box: every core takes from the same
/// bucket, so the limit is the box's whatever core answers. Bounded memory: a fixed table
/// of at most `addresses_max` entries, set-associative, evicting the least recently seen
/// in the set (an evicted address simply starts again with a full bucket). Each set sits
/// behind its own [`SpinCell`]; two cores contend only on the same set at the same time.
/// No allocation after new(); 320 bytes per set of 8 addresses (40 bytes per address).
pub struct RateLimiter {
    /// Refill per millisecond in milli-tokens, which is also the capacity in tokens.
    rate: AtomicI64,
    ways: usize,
    sets: Box<[SpinCell<Set>]>,
    tracked: AtomicUsize,
    /// Keys the set an address maps to (0: fixed); see [`crate::hash::box_secret`].
    key: u64,
}

impl RateLimiter {
    /// The same limiter with its sets keyed by `key`, so no client can tell which
    /// addresses share a set (and evict each other).
    pub fn keyed(mut self, key: u64) -> Self {
        self.key = key;
        self
    }

    /// `events_per_sec` and `addresses_max` below 1 are taken as 1: a limiter that
    /// refuses everyone forever or tracks no one is never what a setting meant.
    pub fn new(events_per_sec: u32, addresses_max: usize) -> Self {
        let addresses_max = addresses_max.max(1);
        let ways = addresses_max.min(WAYS);
        let sets = addresses_max / ways;
        RateLimiter {
            rate: AtomicI64::new(events_per_sec.max(1) as i64),
            ways,
            sets: (0..sets).map(|_| SpinCell::new(Set::default())).collect(),
            tracked: AtomicUsize::new(0),
            key: 0,
        }
    }

    /// A new limit for every address from now on; buckets keep their balance (capped at
    /// the new capacity on their next refill).
    pub fn set_rate(&self, events_per_sec: u32) {
        self.rate
            .store(events_per_sec.max(1) as i64, Ordering::Relaxed);
    }

    /// Takes `n` tokens for `addr` at `now_ms`. Bucket capacity = events_per_sec. A request is admitted when the bucket holds at least min(n, capacity) tokens; the balance may go negative by the excess (debt), so one large batch passes once and the long-run rate still equals the limit. Err(retry_after_ms) when refused (time until admitted, >= 1).
    pub fn try_take(&self, addr: IpAddr, n: u32, now_ms: u64) -> Result<(), u64> {
        if n == 0 {
            return Ok(());
        }
        let rate = self.rate.load(Ordering::Relaxed);
        let capacity_milli = rate * MILLI;
        let key = key_of(addr);
        let h = mix64(key[0] ^ mix64(key[1] ^ self.key));
        let set = ((h as u128 * self.sets.len() as u128) >> 64) as usize;
        let ways = self.ways;
        self.sets[set].with(|set| {
            let slot = slot_for(set, ways, key, now_ms, capacity_milli, &self.tracked);
            let elapsed = now_ms.saturating_sub(slot.seen_ms);
            // Widened so a long-idle bucket saturates to full instead of overflowing; a
            // bucket deep in debt may need far more than one second of refill.
            let refill = (elapsed as i128 * rate as i128).min(i64::MAX as i128) as i64;
            slot.tokens = slot.tokens.saturating_add(refill).min(capacity_milli);
            slot.seen_ms = slot.seen_ms.max(now_ms);
            let asked = n as i64 * MILLI;
            let needed = asked.min(capacity_milli);
            if slot.tokens >= needed {
                slot.tokens -= asked;
                Ok(())
            } else {
                let missing = needed - slot.tokens;
                let wait_ms = (missing + rate - 1) / rate;
                Err(wait_ms.max(1) as u64)
            }
        })
    }

    /// Addresses currently holding a slot.
    pub fn tracked(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    /// The most addresses the table holds.
    pub fn capacity(&self) -> usize {
        self.sets.len() * self.ways
    }

    /// Bytes of the table.
    pub fn memory_bytes(&self) -> usize {
        self.sets.len() * std::mem::size_of::<SpinCell<Set>>()
    }
}

/// The slot for `key` in `set`, claiming a free or the least recently seen one.
fn slot_for<'a>(
    set: &'a mut Set,
    ways: usize,
    key: [u64; 2],
    now_ms: u64,
    capacity_milli: i64,
    tracked: &AtomicUsize,
) -> &'a mut Slot {
    let occupied = set.occupied;
    let mut free = None;
    let mut oldest: Option<(usize, u64)> = None;
    for way in 0..ways {
        if occupied & (1 << way) == 0 {
            free = free.or(Some(way));
            continue;
        }
        let slot = &set.slots[way];
        if slot.key == key {
            return &mut set.slots[way];
        }
        if oldest.is_none_or(|(_, seen)| slot.seen_ms < seen) {
            oldest = Some((way, slot.seen_ms));
        }
    }
    let way = match (free, oldest) {
        (Some(way), _) => {
            set.occupied |= 1 << way;
            tracked.fetch_add(1, Ordering::Relaxed);
            way
        }
        (None, Some((way, _))) => way,
        // Unreachable: a set has at least one way, free or occupied.
        (None, None) => 0,
    };
    let slot = &mut set.slots[way];
    *slot = Slot {
        key,
        tokens: capacity_milli,
        seen_ms: now_ms,
    };
    slot
}

fn key_of(addr: IpAddr) -> [u64; 2] {
    let v6 = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    let bits = u128::from(v6);
    [(bits >> 64) as u64, bits as u64]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn admits_capacity_then_refuses_with_a_retry_time() {
        let rl = RateLimiter::new(10, 1024);
        let a = ip("203.0.113.7");
        for _ in 0..10 {
            assert_eq!(rl.try_take(a, 1, 1_000), Ok(()));
        }
        assert_eq!(rl.try_take(a, 1, 1_000), Err(100));
        assert_eq!(rl.try_take(a, 1, 1_099), Err(1));
        assert_eq!(rl.try_take(a, 1, 1_100), Ok(()));
        // Another address has its own bucket.
        assert_eq!(rl.try_take(ip("203.0.113.8"), 10, 1_100), Ok(()));
        assert_eq!(rl.tracked(), 2);
    }

    #[test]
    fn long_run_rate_equals_the_limit() {
        let rl = RateLimiter::new(100, 16);
        let a = ip("2001:db8::1");
        let mut admitted = 0u64;
        for ms in 0..10_000u64 {
            // Ten attempts per ms, far over the limit.
            for _ in 0..10 {
                if rl.try_take(a, 1, ms).is_ok() {
                    admitted += 1;
                }
            }
        }
        // Initial burst of 100 plus 100/s over ~10 s.
        assert!((1_090..=1_101).contains(&admitted), "{admitted}");
    }

    #[test]
    fn an_oversized_batch_passes_once_then_pays_its_debt() {
        let rl = RateLimiter::new(100, 16);
        let a = ip("198.51.100.1");
        assert_eq!(rl.try_take(a, 500, 0), Ok(()));
        // 400 tokens of debt, plus 1 needed: 401 tokens at 100/s = 4010 ms.
        assert_eq!(rl.try_take(a, 1, 0), Err(4_010));
        assert!(rl.try_take(a, 1, 4_009).is_err());
        assert_eq!(rl.try_take(a, 1, 4_010), Ok(()));
        // A batch over capacity needs a full bucket, not `n` tokens.
        let b = ip("198.51.100.2");
        assert_eq!(rl.try_take(b, 50, 0), Ok(()));
        assert_eq!(rl.try_take(b, 10_000, 0), Err(500));
        assert_eq!(rl.try_take(b, 10_000, 500), Ok(()));
    }

    #[test]
    fn ipv4_and_mapped_ipv6_share_a_bucket() {
        let rl = RateLimiter::new(2, 16);
        assert!(rl.try_take(ip("192.0.2.1"), 2, 0).is_ok());
        assert!(rl.try_take(ip("::ffff:192.0.2.1"), 1, 0).is_err());
        assert!(rl.try_take(ip("::ffff:192.0.2.2"), 1, 0).is_ok());
        assert_eq!(rl.tracked(), 2);
    }

    #[test]
    fn clock_going_backwards_neither_refills_nor_panics() {
        let rl = RateLimiter::new(1, 4);
        let a = ip("::1");
        assert!(rl.try_take(a, 1, 10_000).is_ok());
        assert!(rl.try_take(a, 1, 0).is_err());
        assert!(rl.try_take(a, 1, 10_999).is_err());
        assert!(rl.try_take(a, 1, 11_000).is_ok());
        assert!(rl.try_take(a, u32::MAX, u64::MAX).is_ok());
        assert!(rl.try_take(a, u32::MAX, u64::MAX).is_err());
    }

    #[test]
    fn memory_is_bounded_and_evicts_least_recently_seen() {
        let rl = RateLimiter::new(1, 1000);
        let cap = rl.capacity();
        assert!(cap <= 1000);
        for i in 0..100_000u32 {
            let _ = rl.try_take(IpAddr::V4(Ipv4Addr::from(i)), 1, i as u64);
        }
        assert!(rl.tracked() <= 1000);
        assert_eq!(rl.tracked(), cap);
        assert_eq!(rl.capacity(), cap);
        // The most recent address is still tracked (its bucket is empty) ...
        assert!(rl
            .try_take(IpAddr::V4(Ipv4Addr::from(99_999u32)), 1, 99_999)
            .is_err());
        // ... while an early one was evicted and starts again full.
        assert!(rl
            .try_take(IpAddr::V4(Ipv4Addr::from(0u32)), 1, 99_999)
            .is_ok());
    }

    #[test]
    fn tiny_tables_still_work() {
        let rl = RateLimiter::new(0, 0);
        let a = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let b = ip("10.0.0.1");
        assert!(rl.try_take(a, 1, 0).is_ok());
        assert!(rl.try_take(a, 1, 0).is_err());
        assert!(rl.try_take(b, 1, 1).is_ok());
        assert_eq!(rl.tracked(), 1);
        // `a` was evicted by `b`: it starts again full.
        assert!(rl.try_take(a, 1, 2).is_ok());
        assert_eq!(rl.try_take(a, 0, 2), Ok(()));
    }

    #[test]
    fn recently_seen_addresses_survive_a_scan() {
        // One set of 8: keep one address hot while a scan of others passes through.
        let rl = RateLimiter::new(1_000, 8);
        let hot = ip("10.9.9.9");
        assert!(rl.try_take(hot, 1_000, 0).is_ok());
        for i in 0..100u32 {
            let now = 1 + i as u64;
            let _ = rl.try_take(IpAddr::V4(Ipv4Addr::from(i)), 1, now);
            if i % 4 == 0 {
                // The hot address keeps being seen, so it is never the oldest.
                let _ = rl.try_take(hot, 1, now);
            }
        }
        // Still in debt-free but nearly empty bucket: it was not reset to full.
        assert!(rl.try_take(hot, 1_000, 101).is_err());
    }

    /// Every thread takes from one address's bucket: the box admits the limit, not the
    /// limit per thread.
    #[test]
    fn the_limit_holds_across_threads() {
        let rl = RateLimiter::new(1_000, 1024);
        let a = ip("203.0.113.9");
        let admitted = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..10_000 {
                        if rl.try_take(a, 1, 5_000).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 1_000);
        // The figure the settings document: 40 bytes per address.
        assert_eq!(rl.memory_bytes(), rl.capacity() * 40);
        rl.set_rate(10);
        assert_eq!(rl.try_take(a, 1, 5_000), Err(100));
    }
}
