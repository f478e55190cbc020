//! Our HLL sketches in Redis's own HyperLogLog string layout, so that Redis merges the
//! sketches of every core and box with `PFMERGE` and answers `PFCOUNT` across them.
//!
//! Why this and not `PFADD` of user hashes: a delta frame carries sketches, not users
//! (that is what keeps frames small), and a dense sketch cannot give its users back.
//! Both sides use p = 14 and 6-bit registers holding rank 1..=51, so a register-wise max
//! in Redis is the same union our `Hll::merge` computes. Registers are filled with our
//! hash (`clickgate_core::hash::bytes_hash`), not Redis's MurmurHash64A: that is fine as
//! long as nobody `PFADD`s raw user ids into these keys (only the flusher writes them),
//! because `PFCOUNT` looks at the register histogram only, which has the same
//! distribution for any good 64-bit hash.
//!
//! Layout (redis `hyperloglog.c`): a 16-byte header `"HYLL"`, encoding (0 dense, 1
//! sparse), 3 unused bytes, an 8-byte little-endian cached cardinality whose top bit
//! set means "stale" (we always send it stale); then either 12,288 bytes of registers
//! packed 6 bits each, least significant bit first (the very packing of our dense wire
//! form), or sparse opcodes: `ZERO` `00xxxxxx` (1..=64 zero registers), `XZERO`
//! `01xxxxxx yyyyyyyy` (1..=16384), `VAL` `1vvvvvxx` (1..=4 registers of value 1..=32).
//! A sketch with a register above 32 must be dense.
//!
//! A small change is written without `PFMERGE` (which walks all 16,384 registers of the
//! destination, and for a sparse one re-scans the string per register): `PFADD` of one
//! crafted 8-byte element per non-zero register. Redis hashes an element with
//! MurmurHash64A (seed `0xadc83b19`); for 8-byte inputs that function is a bijection
//! on `u64` (multiplications by an odd constant and right xor-shifts of 47 ≥ 32 bits,
//! each invertible), so [`pfadd_element`] inverts it to get an element whose hash has
//! the register index in its low 14 bits and the rank as the position of the first set
//! bit above them: `PFADD` then raises exactly that register to at least that rank,
//! the same register-wise max as a merge.

use clickgate_core::hll::{HllError, DENSE_WIRE_BYTES, PRECISION, REGISTERS};

const HDR_BYTES: usize = 16;
/// Size of a dense Redis HLL string.
pub const REDIS_DENSE_BYTES: usize = HDR_BYTES + DENSE_WIRE_BYTES;
const SPARSE_VAL_MAX: u8 = 32;

fn header(encoding: u8, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HYLL");
    out.extend_from_slice(&[encoding, 0, 0, 0]);
    // Cached cardinality: stale (top bit of the last byte), so Redis recomputes it.
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x80]);
}

fn zeros(mut n: usize, out: &mut Vec<u8>) {
    while n > 0 {
        if n > 64 {
            let len = n.min(REGISTERS);
            let v = (len - 1) as u16;
            out.push(0x40 | (v >> 8) as u8);
            out.push(v as u8);
            n -= len;
        } else {
            out.push((n - 1) as u8);
            n = 0;
        }
    }
}

/// Converts our wire form (`Hll::to_bytes`) to a Redis HLL string. `Ok(None)` for an
/// empty sketch (nothing to merge).
pub fn to_redis_hll(wire: &[u8]) -> Result<Option<Vec<u8>>, HllError> {
    if wire.is_empty() {
        return Ok(None);
    }
    if wire.len() < 2 {
        return Err(HllError::Length(wire.len()));
    }
    if wire[1] != PRECISION as u8 {
        return Err(HllError::Precision(wire[1]));
    }
    match wire[0] {
        2 => {
            if wire.len() != 2 + DENSE_WIRE_BYTES {
                return Err(HllError::Length(wire.len()));
            }
            let mut out = Vec::with_capacity(REDIS_DENSE_BYTES);
            header(0, &mut out);
            out.extend_from_slice(&wire[2..]);
            Ok(Some(out))
        }
        1 => {
            if wire.len() < 4 {
                return Err(HllError::Length(wire.len()));
            }
            let n = u16::from_le_bytes([wire[2], wire[3]]) as usize;
            if wire.len() != 4 + 3 * n || n > REGISTERS {
                return Err(HllError::Length(wire.len()));
            }
            let entries = wire[4..]
                .chunks_exact(3)
                .map(|e| (u16::from_le_bytes([e[0], e[1]]) as usize, e[2]));
            if entries.clone().any(|(_, r)| r > SPARSE_VAL_MAX) {
                return Ok(Some(dense_from_entries(entries)?));
            }
            let mut out = Vec::with_capacity(HDR_BYTES + 4 * n + 4);
            header(1, &mut out);
            let mut next = 0usize; // first register not yet encoded
            for (idx, rank) in entries {
                if idx < next || idx >= REGISTERS {
                    return Err(HllError::Order);
                }
                if rank == 0 {
                    return Err(HllError::Register(rank));
                }
                zeros(idx - next, &mut out);
                out.push(0x80 | ((rank - 1) << 2));
                next = idx + 1;
            }
            zeros(REGISTERS - next, &mut out);
            Ok(Some(out))
        }
        t => Err(HllError::Tag(t)),
    }
}

const MURMUR_M: u64 = 0xc6a4_a793_5bd1_e995;
const MURMUR_SEED: u64 = 0xadc8_3b19;
/// MurmurHash64A's state before the first block of an 8-byte key.
const MURMUR_H0: u64 = MURMUR_SEED ^ 8u64.wrapping_mul(MURMUR_M);

/// The inverse of `MURMUR_M` modulo 2^64 (Newton's iteration: 3 → 96 correct bits).
const MURMUR_M_INV: u64 = {
    let mut x = MURMUR_M;
    let mut i = 0;
    while i < 5 {
        x = x.wrapping_mul(2u64.wrapping_sub(MURMUR_M.wrapping_mul(x)));
        i += 1;
    }
    x
};

/// `x ^= x >> 47` is its own inverse (47 ≥ 32).
fn unshift(x: u64) -> u64 {
    x ^ (x >> 47)
}

/// The 8-byte element whose Redis HLL hash is `hash`.
fn murmur64a_preimage(hash: u64) -> [u8; 8] {
    let mut h = unshift(hash);
    h = unshift(h.wrapping_mul(MURMUR_M_INV));
    h = h.wrapping_mul(MURMUR_M_INV);
    let k = h ^ MURMUR_H0;
    let k = unshift(k.wrapping_mul(MURMUR_M_INV)).wrapping_mul(MURMUR_M_INV);
    k.to_le_bytes()
}

/// The element that `PFADD` turns into register `idx` at rank `rank` (1..=51, as Redis
/// counts: 1 + the trailing zeros of the 50 hash bits above the index).
pub fn pfadd_element(idx: usize, rank: u8) -> [u8; 8] {
    debug_assert!(idx < REGISTERS && (1..=51).contains(&rank));
    let above = if rank <= 50 {
        1u64 << (PRECISION as u64 + rank as u64 - 1)
    } else {
        0
    };
    murmur64a_preimage(idx as u64 | above)
}

/// Calls `f(index, rank)` for every non-zero register of a sketch in our wire form, in
/// index order; returns how many. Validates like [`to_redis_hll`].
pub fn for_each_register(wire: &[u8], mut f: impl FnMut(usize, u8)) -> Result<usize, HllError> {
    if wire.is_empty() {
        return Ok(0);
    }
    if wire.len() < 2 {
        return Err(HllError::Length(wire.len()));
    }
    if wire[1] != PRECISION as u8 {
        return Err(HllError::Precision(wire[1]));
    }
    let mut n = 0;
    match wire[0] {
        1 => {
            if wire.len() < 4 {
                return Err(HllError::Length(wire.len()));
            }
            let count = u16::from_le_bytes([wire[2], wire[3]]) as usize;
            if wire.len() != 4 + 3 * count || count > REGISTERS {
                return Err(HllError::Length(wire.len()));
            }
            let mut next = 0usize;
            for e in wire[4..].chunks_exact(3) {
                let (idx, rank) = (u16::from_le_bytes([e[0], e[1]]) as usize, e[2]);
                if idx < next || idx >= REGISTERS {
                    return Err(HllError::Order);
                }
                if rank == 0 || rank > 51 {
                    return Err(HllError::Register(rank));
                }
                f(idx, rank);
                n += 1;
                next = idx + 1;
            }
        }
        2 => {
            if wire.len() != 2 + DENSE_WIRE_BYTES {
                return Err(HllError::Length(wire.len()));
            }
            for (i, c) in wire[2..].chunks_exact(3).enumerate() {
                let v = u32::from_le_bytes([c[0], c[1], c[2], 0]);
                if v == 0 {
                    continue;
                }
                for k in 0..4 {
                    let r = ((v >> (6 * k)) & 0x3f) as u8;
                    if r > 51 {
                        return Err(HllError::Register(r));
                    }
                    if r != 0 {
                        f(4 * i + k, r);
                        n += 1;
                    }
                }
            }
        }
        t => return Err(HllError::Tag(t)),
    }
    Ok(n)
}

fn dense_from_entries(entries: impl Iterator<Item = (usize, u8)>) -> Result<Vec<u8>, HllError> {
    let mut out = Vec::with_capacity(REDIS_DENSE_BYTES);
    header(0, &mut out);
    out.resize(REDIS_DENSE_BYTES, 0);
    let regs = &mut out[HDR_BYTES..];
    for (idx, rank) in entries {
        if idx >= REGISTERS {
            return Err(HllError::Order);
        }
        if rank == 0 || rank > 63 {
            return Err(HllError::Register(rank));
        }
        let bit = idx * 6;
        let (byte, shift) = (bit / 8, bit % 8);
        let v = (rank as u16) << shift;
        regs[byte] |= v as u8;
        if byte + 1 < regs.len() {
            regs[byte + 1] |= (v >> 8) as u8;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickgate_core::hll::Hll;

    /// Decodes a Redis HLL string back into registers (the reference for the tests).
    fn registers(r: &[u8]) -> Vec<u8> {
        assert_eq!(&r[..4], b"HYLL");
        let mut regs = Vec::with_capacity(REGISTERS);
        if r[4] == 0 {
            assert_eq!(r.len(), REDIS_DENSE_BYTES);
            for i in 0..REGISTERS {
                let bit = i * 6;
                let (b, s) = (bit / 8, bit % 8);
                let lo = r[HDR_BYTES + b] as u16;
                let hi = *r.get(HDR_BYTES + b + 1).unwrap_or(&0) as u16;
                regs.push((((lo | hi << 8) >> s) & 63) as u8);
            }
        } else {
            let mut i = HDR_BYTES;
            while i < r.len() {
                let op = r[i];
                if op & 0xc0 == 0 {
                    regs.extend(std::iter::repeat_n(0, (op & 63) as usize + 1));
                } else if op & 0xc0 == 0x40 {
                    let len = (((op & 63) as usize) << 8 | r[i + 1] as usize) + 1;
                    regs.extend(std::iter::repeat_n(0, len));
                    i += 1;
                } else {
                    let v = ((op >> 2) & 31) + 1;
                    regs.extend(std::iter::repeat_n(v, (op & 3) as usize + 1));
                }
                i += 1;
            }
        }
        assert_eq!(regs.len(), REGISTERS);
        regs
    }

    fn check(users: u64) {
        let mut h = Hll::new();
        for u in 0..users {
            h.insert_hash(clickgate_core::hash::bytes_hash(format!("u{u}").as_bytes()));
        }
        let r = to_redis_hll(&h.to_bytes()).unwrap().unwrap();
        let regs = registers(&r);
        for (i, &v) in regs.iter().enumerate() {
            assert_eq!(v, h.register(i), "register {i} of a {users}-user sketch");
        }
    }

    #[test]
    fn registers_survive_the_conversion() {
        for users in [1, 5, 7, 100, 1000, 3000, 50_000] {
            check(users);
        }
        assert_eq!(to_redis_hll(&[]).unwrap(), None);
    }

    /// MurmurHash64A of an 8-byte key, as Redis computes it for `PFADD`.
    fn murmur64a(key: [u8; 8]) -> u64 {
        let mut h = MURMUR_H0;
        let mut k = u64::from_le_bytes(key).wrapping_mul(MURMUR_M);
        k ^= k >> 47;
        k = k.wrapping_mul(MURMUR_M);
        h ^= k;
        h = h.wrapping_mul(MURMUR_M);
        h ^= h >> 47;
        h = h.wrapping_mul(MURMUR_M);
        h ^ (h >> 47)
    }

    /// Redis's `hllPatLen`: (register, rank) of an element.
    fn redis_point(e: [u8; 8]) -> (usize, u8) {
        let h = murmur64a(e);
        let idx = (h & (REGISTERS as u64 - 1)) as usize;
        let rest = (h >> PRECISION) | 1 << 50;
        (idx, rest.trailing_zeros() as u8 + 1)
    }

    #[test]
    fn crafted_elements_land_on_their_register_and_rank() {
        assert_eq!(MURMUR_M.wrapping_mul(MURMUR_M_INV), 1);
        for idx in [0, 1, 5, 4095, 8192, REGISTERS - 1] {
            for rank in 1..=51u8 {
                assert_eq!(redis_point(pfadd_element(idx, rank)), (idx, rank));
            }
        }
    }

    #[test]
    fn registers_are_listed_from_both_wire_forms() {
        for users in [0u64, 3, 500, 30_000] {
            let mut h = Hll::new();
            for u in 0..users {
                h.insert_hash(clickgate_core::hash::bytes_hash(format!("u{u}").as_bytes()));
            }
            let mut seen = Vec::new();
            let n = for_each_register(&h.to_bytes(), |i, r| seen.push((i, r))).unwrap();
            assert_eq!(n, seen.len());
            let want: Vec<(usize, u8)> = (0..REGISTERS)
                .map(|i| (i, h.register(i)))
                .filter(|&(_, r)| r != 0)
                .collect();
            assert_eq!(seen, want, "{users} users");
        }
        assert!(for_each_register(&[2, 14, 0], |_, _| ()).is_err());
        assert!(for_each_register(&[1, 14, 2, 0, 5, 0, 1, 4, 0, 1], |_, _| ()).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &[1u8][..],
            &[9, 14],
            &[1, 13, 0, 0],
            &[1, 14, 2, 0, 0, 0, 1],
            &[2, 14, 0],
        ] {
            assert!(to_redis_hll(bad).is_err(), "{bad:?}");
        }
        // Out of order entries.
        assert!(to_redis_hll(&[1, 14, 2, 0, 5, 0, 1, 4, 0, 1]).is_err());
    }
}
