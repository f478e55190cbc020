//! Hashes that pick owners and feed sketches. Fixed functions (no per-process seed), so
//! every core, every box and every replay computes the same value for the same key —
//! except where a table's layout is all a hash decides and its keys come from clients
//! ([`box_secret`]).

use crate::EventId;

/// 64-bit finaliser of splitmix64 / murmur3 fmix64: a cheap, well-mixed bijection.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// A fixed, unseeded hasher for integer keys (ids, tuples of ids): each `u64` written is
/// folded into the state through [`mix64`], and the state is mixed once more at the
/// end. A single id hashes to `mix64(id)`. For tables whose keys are already integers
/// (the fraud rules' ad ids, billing's per-campaign totals), several times cheaper than
/// SipHash; collisions only ever cost time.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        mix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = mix64(self.0) ^ v;
    }
}

/// A secret drawn once per process from the operating system's randomness (through std's
/// `RandomState`). The dataplane keys the tables whose keys clients choose with it (the
/// pre-aggregation table, the per-address and per-IP tables), so a client cannot aim keys
/// at one probe chain or one set: it would need the secret. Nothing that must be the same
/// on every run uses it — the tables' outputs do not depend on their layout.
pub fn box_secret() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static SECRET: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SECRET.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x636c_6963_6b67_6174);
        // Never 0: 0 is the unkeyed (fixed) layout.
        h.finish() | 1
    })
}

/// [`IdHasher`]'s folding started from [`box_secret`], with every integer width folded
/// the same way (derived `Hash` of enums writes their discriminant as an `isize`): for
/// tables keyed by integers that clients choose (the controlplane store's cells), so
/// they cost an `IdHasher`'s time and still cannot be aimed at one probe chain.
#[derive(Clone, Copy)]
pub struct SecretIdHasher(u64);

impl std::hash::Hasher for SecretIdHasher {
    fn finish(&self) -> u64 {
        mix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = mix64(self.0) ^ v;
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
    fn write_isize(&mut self, v: isize) {
        self.write_u64(v as u64);
    }
}

/// `BuildHasher` of [`SecretIdHasher`].
#[derive(Clone, Copy, Default)]
pub struct SecretIdBuildHasher;

impl std::hash::BuildHasher for SecretIdBuildHasher {
    type Hasher = SecretIdHasher;
    fn build_hasher(&self) -> SecretIdHasher {
        SecretIdHasher(box_secret())
    }
}

/// `BuildHasher` of [`IdHasher`], for `HashMap<K, V, IdBuildHasher>`.
pub type IdBuildHasher = std::hash::BuildHasherDefault<IdHasher>;

/// The event id's 64-bit hash: both halves of the UUID folded and mixed. UUID bits are
/// mostly random already; the mix guards against ids with structured (e.g. v1/v7) bits.
#[inline]
pub fn event_hash(id: &EventId) -> u64 {
    let hi = u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes"));
    let lo = u64::from_le_bytes(id.0[8..].try_into().expect("8 bytes"));
    mix64(hi ^ mix64(lo))
}

/// The core that owns a hash (its dedup bloom shard). A pure function of the hash so a
/// duplicate meets its original whichever core receives it. Uses the top bits, which the
/// bloom filter does not use for its index derivation.
#[inline]
pub fn shard_for(hash: u64, shards: usize) -> usize {
    debug_assert!(shards > 0);
    (((hash >> 32) * shards as u64) >> 32) as usize
}

/// FNV-1a over bytes then mixed: the hash of strings such as `user_id` for HLL sketches.
#[inline]
pub fn bytes_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_hasher_gives_one_id_its_mix_and_tells_swapped_pairs_apart() {
        use std::hash::BuildHasher;
        let h = IdBuildHasher::default();
        assert_eq!(h.hash_one(42u64), mix64(42));
        assert_ne!(h.hash_one((1u64, 2u64)), h.hash_one((2u64, 1u64)));
        assert_ne!(h.hash_one((7u64, 7u64)), h.hash_one((9u64, 9u64)));
    }

    /// The store's cell hasher is keyed (a client cannot compute where an id lands) and
    /// still tells apart what a derived `Hash` writes: enum variants of one value, and
    /// swapped pairs.
    #[test]
    fn the_secret_id_hasher_is_keyed_and_tells_variants_apart() {
        use crate::agg::Dim;
        use std::hash::BuildHasher;
        let k = SecretIdBuildHasher;
        let u = IdBuildHasher::default();
        assert_eq!(
            k.hash_one((7u64, Dim::Ad(3))),
            k.hash_one((7u64, Dim::Ad(3)))
        );
        assert_ne!(
            k.hash_one(7u64),
            u.hash_one(7u64),
            "keyed by the box secret"
        );
        assert_ne!(
            k.hash_one((7u64, Dim::Ad(3))),
            k.hash_one((7u64, Dim::Publisher(3)))
        );
        assert_ne!(k.hash_one((1u64, 2u64)), k.hash_one((2u64, 1u64)));
        // Ids one apart spread over a small table's slots.
        let slots: std::collections::HashSet<u64> =
            (0..64u64).map(|c| k.hash_one((c, Dim::All)) % 64).collect();
        assert!(slots.len() > 32, "{} of 64 slots", slots.len());
    }

    #[test]
    fn shard_for_stays_in_range_and_spreads() {
        let mut counts = [0usize; 3];
        for i in 0..30_000u64 {
            counts[shard_for(mix64(i), 3)] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn event_id_round_trips_text() {
        let s = "6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f";
        let id = EventId::parse(s).unwrap();
        assert_eq!(id.to_string(), s);
        assert_eq!(EventId::parse(&s.to_uppercase()), Some(id));
        assert_eq!(EventId::parse("6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5"), None);
        assert_eq!(EventId::parse("6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5g"), None);
        assert_eq!(EventId::parse("6f1c2f4e08a3b-4c1d-9e2f-0a1b2c3d4e5f"), None);
    }
}
