//! The Java client's default partitioner, so clickgate and any Java producer (or Kafka
//! Streams join) put a key on the same partition: `(murmur2(key) & 0x7fffffff) % n`.
//! librdkafka's `partitioner=murmur2_random` computes the same for non-null keys; this
//! copy exists to check that (tests) and to tell tests which partition to expect.

/// Kafka's `Utils.murmur2`: MurmurHash2, seed 0x9747b28c, little-endian 4-byte words.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ len as u32;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        let mut k = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = words.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java default partitioner picks for `key` among `partitions` (> 0).
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2(key) as u32 & 0x7fff_ffff) % partitions
}

/// The record key of a campaign: its decimal text (what a Java `StringSerializer` would
/// write), readable in every Kafka tool, and partitioned the same by any client.
pub fn campaign_key(campaign_id: u64, buf: &mut itoa::Buffer) -> &[u8] {
    buf.format(campaign_id).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of Kafka's own `UtilsTest.testMurmur2` (clients/src/test/.../UtilsTest.java).
    #[test]
    fn java_murmur2_vectors() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key), want, "key {:?}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn partition_is_positive_modulo() {
        // murmur2("21") is negative: the sign bit is masked before the modulo, as in Java.
        let h = (-973932308i32 as u32) & 0x7fff_ffff;
        assert_eq!(partition_for(b"21", 7), h % 7);
        for n in 1..20 {
            assert!(partition_for(b"foobar", n) < n);
        }
        let mut b = itoa::Buffer::new();
        assert_eq!(campaign_key(12345, &mut b), b"12345");
    }
}
