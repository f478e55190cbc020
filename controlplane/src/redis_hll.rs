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
