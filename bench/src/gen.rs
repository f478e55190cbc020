//! Traffic generation: a fast RNG, a Zipf sampler, unique UUID text and
//! docs/schema.md click events written straight into reused byte buffers.

/// wyrand: tiny, fast, good enough for load shaping (not cryptographic).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(mix64(seed ^ 0x5851_f42d_4c95_7f2d))
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) ^ t) as u64
    }

    /// Uniform in `0..n` (n > 0), Lemire's multiply-shift (bias negligible here).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    #[inline]
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    #[inline]
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.f64() < p
    }
}

/// splitmix64 finalizer: a bijection on u64.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

const M62: u64 = (1 << 62) - 1;

/// A bijection on the low 62 bits (odd multiplies and xor-shifts mod 2^62), so
/// distinct counters give distinct, random-looking values.
#[inline]
fn mix62(mut x: u64) -> u64 {
    x &= M62;
    x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15) & M62;
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9) & M62;
    x ^= x >> 29;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb) & M62;
    x ^ (x >> 32)
}

/// Zipf(s) over ranks `1..=n`, sampled in O(1) with Vose's alias method
/// (no branchy binary search on the per-event path).
pub struct Zipf {
    /// Keep rank i+1 if a uniform u64 is below `keep[i]`, else take `alias[i]`.
    keep: Vec<u64>,
    alias: Vec<u32>,
}

impl Zipf {
    pub fn new(n: u64, s: f64) -> Self {
        let n = n.clamp(1, u32::MAX as u64) as usize;
        let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
        let total: f64 = weights.iter().sum();
        let mut scaled: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
        let mut alias: Vec<u32> = (0..n as u32).collect();
        let mut keep = vec![u64::MAX; n];
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < 1.0);
        while let (Some(&l), Some(&g)) = (small.last(), large.last()) {
            small.pop();
            keep[l] = (scaled[l] * u64::MAX as f64) as u64;
            alias[l] = g as u32;
            scaled[g] -= 1.0 - scaled[l];
            if scaled[g] < 1.0 {
                large.pop();
                small.push(g);
            }
        }
        // Leftovers are 1.0 up to rounding: always keep (already u64::MAX).
        Zipf { keep, alias }
    }

    /// A rank in `1..=n`.
    #[inline]
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let i = rng.below(self.keep.len() as u64) as usize;
        let i = if rng.next_u64() < self.keep[i] {
            i
        } else {
            self.alias[i] as usize
        };
        i as u64 + 1
    }
}

const DIGITS2: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Appends the decimal text of `v`, written in place into the spare capacity
/// (no per-number memcpy call).
#[inline]
pub fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let n = if v == 0 { 1 } else { v.ilog10() as usize + 1 };
    out.reserve(n);
    let len = out.len();
    let spare = &mut out.spare_capacity_mut()[..n];
    let mut i = n;
    while v >= 100 {
        let d = (v % 100) as usize * 2;
        v /= 100;
        spare[i - 1].write(DIGITS2[d + 1]);
        spare[i - 2].write(DIGITS2[d]);
        i -= 2;
    }
    if v >= 10 {
        let d = v as usize * 2;
        spare[i - 1].write(DIGITS2[d + 1]);
        spare[i - 2].write(DIGITS2[d]);
    } else {
        spare[i - 1].write(b'0' + v as u8);
    }
    // SAFETY: the first n bytes of the spare capacity were all written above
    // (i reaches 2 or 1 exactly at the leading digits).
    unsafe { out.set_len(len + n) };
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes the low `out.len()` hex digits of `v` into `out`.
#[inline]
fn hex_into(out: &mut [u8], v: u64) {
    let n = out.len();
    for (i, b) in out.iter_mut().enumerate() {
        let shift = 4 * (n - 1 - i);
        *b = HEX[((v >> shift) & 0xf) as usize];
    }
}

/// Unique version-4 UUID text from (stream, counter): the high half is fixed per
/// stream (run nonce + thread), the low half is a 62-bit bijection of the counter.
#[derive(Clone, Debug)]
pub struct UuidGen {
    /// Text of the fixed high half: `xxxxxxxx-xxxx-4xxx-`.
    head: [u8; 19],
}

/// Two lowercase hex chars per byte value.
static HEX2: [[u8; 2]; 256] = {
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    t
};

impl UuidGen {
    pub fn new(stream: u64) -> Self {
        let hi = (mix64(stream) & !0xf000) | 0x4000; // version 4
        let mut head = [0u8; 19];
        hex_into(&mut head[0..8], hi >> 32);
        head[8] = b'-';
        hex_into(&mut head[9..13], (hi >> 16) & 0xffff);
        head[13] = b'-';
        hex_into(&mut head[14..18], hi & 0xffff);
        head[18] = b'-';
        UuidGen { head }
    }

    /// Formats the id for `counter` (< 2^62) into `out` (8-4-4-4-12), no allocation.
    #[inline]
    pub fn format(&self, counter: u64, out: &mut [u8; 36]) {
        let lo = (mix62(counter) | (0b10 << 62)).to_be_bytes(); // RFC 4122 variant
        out[..19].copy_from_slice(&self.head);
        out[19..21].copy_from_slice(&HEX2[lo[0] as usize]);
        out[21..23].copy_from_slice(&HEX2[lo[1] as usize]);
        out[23] = b'-';
        for (k, &byte) in lo[2..].iter().enumerate() {
            out[24 + 2 * k..26 + 2 * k].copy_from_slice(&HEX2[byte as usize]);
        }
    }
}

/// Shape of the generated traffic.
#[derive(Clone, Debug)]
pub struct Mix {
    pub campaigns: u64,
    pub zipf: f64,
    pub users: u64,
    pub dup_share: f64,
    pub invalid_share: f64,
    pub bot_share: f64,
    pub burst_ips: u64,
    pub burst_share: f64,
    pub late_share: f64,
}

const COUNTRIES: [&str; 12] = [
    "US", "GB", "DE", "FR", "IN", "BR", "JP", "CA", "AU", "ES", "IT", "NL",
];
const DEVICES: [&str; 5] = ["mobile", "desktop", "tablet", "ctv", "other"];
const UAS: [&str; 4] = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
];
const BOT_UAS: [&str; 3] = [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "python-requests/2.31 clickbot",
];
/// How far back a duplicate may reach (keeps it inside any sane dedup window).
const DUP_REACH: u64 = 10_000;

/// Writes events; one per worker thread.
pub struct EventGen {
    rng: Rng,
    ids: UuidGen,
    counter: u64,
    zipf: Zipf,
    mix: Mix,
    id_buf: [u8; 36],
    /// Decimal text of 0..=255: (length, digits).
    octets: Vec<(u8, [u8; 3])>,
    pool: Option<Pool>,
    /// The 13 digits of the current ms timestamp, cached for pooled events.
    now_text: (u64, [u8; 13]),
    /// Where the last fresh event put its id and ts (offsets into `out`), and its ts.
    last_id_at: Option<usize>,
    last_ts_at: usize,
    last_ts: u64,
}

/// The last 13 decimal digits of `v`, zero-padded.
fn digits13(mut v: u64) -> [u8; 13] {
    let mut d = [b'0'; 13];
    for b in d.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
    d
}

struct Pool {
    data: Vec<u8>,
    events: Vec<PoolEvent>,
}

struct PoolEvent {
    start: usize,
    len: usize,
    /// Offset of the 36-byte event_id text, if the line has one.
    id_at: Option<usize>,
    /// Offset of the 13 ts digits (None: not patchable).
    ts_at: Option<usize>,
    ts_delta: i64,
    kind: Kind,
}

/// What kind of line was written (for tests and accounting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Valid,
    Duplicate,
    Invalid,
}

impl EventGen {
    pub fn new(mix: Mix, seed: u64, stream: u64) -> Self {
        EventGen {
            rng: Rng::new(seed ^ mix64(stream)),
            ids: UuidGen::new(stream),
            counter: 0,
            zipf: Zipf::new(mix.campaigns, mix.zipf),
            mix,
            id_buf: [0; 36],
            octets: (0..=255u32)
                .map(|v| {
                    let t = v.to_string();
                    let mut d = [0u8; 3];
                    d[..t.len()].copy_from_slice(t.as_bytes());
                    (t.len() as u8, d)
                })
                .collect(),
            pool: None,
            now_text: (0, digits13(0)),
            last_id_at: None,
            last_ts_at: 0,
            last_ts: 0,
        }
    }

    #[inline]
    fn num(&mut self, out: &mut Vec<u8>, v: u64) {
        push_u64(out, v);
    }

    /// Appends one event (no trailing newline) with `now_ms` as its time.
    pub fn write_event(&mut self, out: &mut Vec<u8>, now_ms: u64) -> Kind {
        if let Some(pool) = self.pool.take() {
            let k = self.write_pooled(&pool, out, now_ms);
            self.pool = Some(pool);
            return k;
        }
        self.write_fresh(out, now_ms)
    }

    /// Switches to pooled generation: `n` events are generated once, and each event
    /// sent is a copy of a random one with a fresh event_id (or a duplicate's) and the
    /// current ts patched in. Much cheaper per event; the mix of the other fields is
    /// limited to the pool's `n` variants.
    pub fn use_pool(&mut self, n: usize) {
        const BASE: u64 = 1_800_000_000_000; // 13 digits, like every ts near now
        let dup = std::mem::replace(&mut self.mix.dup_share, 0.0);
        let mut pool = Pool {
            data: Vec::with_capacity(n * 420),
            events: Vec::with_capacity(n),
        };
        for _ in 0..n {
            let start = pool.data.len();
            let kind = self.write_fresh(&mut pool.data, BASE);
            let ts_at = self.last_ts_at - start;
            let ts_ok = pool.data[ts_at..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count()
                == 13;
            pool.events.push(PoolEvent {
                start,
                len: pool.data.len() - start,
                id_at: self.last_id_at.map(|at| at - start),
                ts_at: ts_ok.then_some(ts_at),
                ts_delta: self.last_ts as i64 - BASE as i64,
                kind,
            });
        }
        self.mix.dup_share = dup;
        self.counter = 0;
        self.pool = Some(pool);
    }

    fn write_pooled(&mut self, pool: &Pool, out: &mut Vec<u8>, now_ms: u64) -> Kind {
        let e = &pool.events[self.rng.below(pool.events.len() as u64) as usize];
        let base = out.len();
        out.extend_from_slice(&pool.data[e.start..e.start + e.len]);
        let mut kind = e.kind;
        if let Some(at) = e.id_at {
            let id = if self.counter > 0 && self.rng.chance(self.mix.dup_share) {
                if kind == Kind::Valid {
                    kind = Kind::Duplicate;
                }
                self.counter - 1 - self.rng.below(self.counter.min(DUP_REACH))
            } else {
                self.counter += 1;
                self.counter - 1
            };
            let slot: &mut [u8; 36] = (&mut out[base + at..base + at + 36]).try_into().unwrap();
            self.ids.format(id, slot);
        }
        if let Some(at) = e.ts_at {
            let slot = &mut out[base + at..base + at + 13];
            if e.ts_delta == 0 {
                if self.now_text.0 != now_ms {
                    self.now_text = (now_ms, digits13(now_ms));
                }
                slot.copy_from_slice(&self.now_text.1);
            } else {
                slot.copy_from_slice(&digits13((now_ms as i64 + e.ts_delta).max(0) as u64));
            }
        }
        kind
    }

    fn write_fresh(&mut self, out: &mut Vec<u8>, now_ms: u64) -> Kind {
        let rng = &mut self.rng;
        let mut kind = Kind::Valid;
        let id = if self.counter > 0 && rng.chance(self.mix.dup_share) {
            kind = Kind::Duplicate;
            self.counter - 1 - rng.below(self.counter.min(DUP_REACH))
        } else {
            self.counter += 1;
            self.counter - 1
        };
        // Which field to break, if any (0 = none).
        let broken = if rng.chance(self.mix.invalid_share) {
            kind = Kind::Invalid;
            1 + rng.below(7)
        } else {
            0
        };
        self.ids.format(id, &mut self.id_buf);

        self.last_id_at = None;
        if broken == 1 {
            out.extend_from_slice(b"{\"event_id\":\"not-a-uuid-");
            out.extend_from_slice(&self.id_buf[..8]);
            out.extend_from_slice(b"\",\"ts\":");
        } else if broken == 2 {
            // event_id missing
            out.extend_from_slice(b"{\"ts\":");
        } else {
            out.extend_from_slice(b"{\"event_id\":\"");
            self.last_id_at = Some(out.len());
            out.extend_from_slice(&self.id_buf);
            out.extend_from_slice(b"\",\"ts\":");
        }
        let rng = &mut self.rng;
        let ts = if broken == 3 {
            now_ms + 3_600_000 // an hour in the future: beyond any skew
        } else if rng.chance(self.mix.late_share) {
            now_ms.saturating_sub(1 + rng.below(3_600_000))
        } else {
            now_ms
        };
        let campaign = self.zipf.sample(rng);
        let ad = campaign * 100 + rng.below(20);
        let publisher = 1 + rng.below(500);
        let advertiser = 1 + campaign % 200;
        let user = rng.below(self.mix.users.max(1));
        let burst = self.mix.burst_ips > 0 && rng.chance(self.mix.burst_share);
        let ip = if burst {
            let k = rng.below(self.mix.burst_ips);
            (198u64 << 24) | (18 << 16) | (k & 0xffff) // 198.18.0.0/15, the benchmarking range
        } else {
            (10u64 << 24) | rng.below(1 << 24)
        };
        let bot = rng.chance(self.mix.bot_share);
        let ua = if bot {
            BOT_UAS[rng.below(BOT_UAS.len() as u64) as usize]
        } else {
            UAS[rng.below(UAS.len() as u64) as usize]
        };
        let country = COUNTRIES[rng.below(COUNTRIES.len() as u64) as usize];
        let device = DEVICES[rng.below(DEVICES.len() as u64) as usize];
        let cost = 1 + rng.below(1_000_000);

        self.last_ts = ts;
        if broken == 4 {
            out.push(b'"');
            self.last_ts_at = out.len();
            self.num(out, ts);
            out.push(b'"');
        } else {
            self.last_ts_at = out.len();
            self.num(out, ts);
        }
        out.extend_from_slice(b",\"campaign_id\":");
        self.num(out, campaign);
        out.extend_from_slice(b",\"ad_id\":");
        self.num(out, ad);
        out.extend_from_slice(b",\"publisher_id\":");
        self.num(out, publisher);
        out.extend_from_slice(b",\"advertiser_id\":");
        self.num(out, advertiser);
        out.extend_from_slice(b",\"user_id\":\"u-");
        self.num(out, user);
        out.extend_from_slice(b"\",\"ip\":\"");
        for (i, shift) in [24u32, 16, 8, 0].into_iter().enumerate() {
            if i > 0 {
                out.push(b'.');
            }
            let (len, d) = &self.octets[((ip >> shift) & 0xff) as usize];
            out.extend_from_slice(&d[..*len as usize]);
        }
        out.extend_from_slice(b"\",\"user_agent\":\"");
        out.extend_from_slice(ua.as_bytes());
        out.extend_from_slice(b"\",\"country\":\"");
        if broken == 5 {
            out.extend_from_slice(b"usa");
        } else {
            out.extend_from_slice(country.as_bytes());
        }
        out.extend_from_slice(b"\",\"device\":\"");
        if broken == 6 {
            out.extend_from_slice(b"phone");
        } else {
            out.extend_from_slice(device.as_bytes());
        }
        out.extend_from_slice(b"\",\"cost_micros\":");
        if broken == 7 {
            out.extend_from_slice(b"\"free\"");
        } else {
            self.num(out, cost);
        }
        out.push(b'}');
        kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn valid_uuid(s: &[u8]) -> bool {
        s.len() == 36
            && s.iter().enumerate().all(|(i, &c)| match i {
                8 | 13 | 18 | 23 => c == b'-',
                _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
            })
    }

    #[test]
    fn uuid_format_is_valid_and_unique() {
        let mut seen = HashSet::new();
        let mut buf = [0u8; 36];
        for stream in 0..4u64 {
            let g = UuidGen::new(stream);
            for c in 0..50_000u64 {
                g.format(c, &mut buf);
                assert!(valid_uuid(&buf), "{}", String::from_utf8_lossy(&buf));
                assert_eq!(buf[14], b'4', "version nibble");
                assert!(b"89ab".contains(&buf[19]), "variant nibble");
                assert!(seen.insert(buf), "duplicate id");
            }
        }
        // Large counters stay unique too (bijection on 62 bits).
        let g = UuidGen::new(9);
        let mut big = HashSet::new();
        for c in (1u64 << 61)..(1u64 << 61) + 10_000 {
            g.format(c, &mut buf);
            assert!(big.insert(buf));
        }
    }

    #[test]
    fn push_u64_matches_to_string() {
        let mut out = Vec::new();
        let mut rng = Rng::new(5);
        let mut vals = vec![
            0u64,
            1,
            9,
            10,
            11,
            99,
            100,
            101,
            999,
            1000,
            u64::MAX,
            u64::MAX / 10,
        ];
        for p in 0..20 {
            vals.push(10u64.pow(p));
            vals.push(10u64.pow(p) - 1);
        }
        vals.extend((0..1000).map(|_| rng.next_u64() >> rng.below(64)));
        for v in vals {
            out.clear();
            out.extend_from_slice(b"x");
            push_u64(&mut out, v);
            assert_eq!(&out[1..], v.to_string().as_bytes());
        }
    }

    #[test]
    fn mix62_is_injective_on_a_sample() {
        let mut seen = HashSet::new();
        for c in 0..200_000u64 {
            assert!(seen.insert(mix62(c)));
        }
    }

    #[test]
    fn zipf_in_range_and_skewed() {
        let z = Zipf::new(1000, 1.1);
        let mut rng = Rng::new(1);
        let mut counts = vec![0u64; 1001];
        for _ in 0..200_000 {
            let k = z.sample(&mut rng);
            assert!((1..=1000).contains(&k));
            counts[k as usize] += 1;
        }
        assert!(counts[1] > counts[2] && counts[2] > counts[10] && counts[10] > counts[500]);
        let one = Zipf::new(1, 1.1);
        for _ in 0..100 {
            assert_eq!(one.sample(&mut rng), 1);
        }
        // Frequencies follow 1/k^s: rank 1 vs rank 2 is about 2^1.1.
        let r = counts[1] as f64 / counts[2] as f64;
        assert!((r - 2f64.powf(1.1)).abs() < 0.15, "ratio {r}");
        let expected_1 = 1.0 / (1..=1000).map(|k| 1.0 / (k as f64).powf(1.1)).sum::<f64>();
        let got_1 = counts[1] as f64 / 200_000.0;
        assert!((got_1 - expected_1).abs() < 0.01, "{got_1} vs {expected_1}");
    }

    #[test]
    fn rng_below_in_range() {
        let mut rng = Rng::new(7);
        for n in [1u64, 2, 3, 10, 1 << 40] {
            for _ in 0..1000 {
                assert!(rng.below(n) < n);
            }
        }
    }

    fn mix() -> Mix {
        Mix {
            campaigns: 1000,
            zipf: 1.1,
            users: 100_000,
            dup_share: 0.0,
            invalid_share: 0.0,
            bot_share: 0.0,
            burst_ips: 0,
            burst_share: 0.5,
            late_share: 0.0,
        }
    }

    #[test]
    fn valid_events_follow_the_contract() {
        let mut g = EventGen::new(mix(), 42, 1);
        let mut ids = HashSet::new();
        let mut out = Vec::new();
        for _ in 0..2000 {
            out.clear();
            assert_eq!(g.write_event(&mut out, 1_764_201_600_123), Kind::Valid);
            let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
            let id = v["event_id"].as_str().unwrap();
            assert!(valid_uuid(id.as_bytes()));
            assert!(ids.insert(id.to_string()));
            assert_eq!(v["ts"].as_u64(), Some(1_764_201_600_123));
            for f in ["campaign_id", "ad_id", "publisher_id", "advertiser_id"] {
                assert!(v[f].as_u64().is_some(), "{f}");
            }
            let c = v["campaign_id"].as_u64().unwrap();
            assert!((1..=1000).contains(&c));
            let user = v["user_id"].as_str().unwrap();
            assert!(!user.is_empty() && user.len() <= 64);
            let ip: std::net::Ipv4Addr = v["ip"].as_str().unwrap().parse().unwrap();
            assert_eq!(ip.octets()[0], 10);
            assert!(v["user_agent"].as_str().unwrap().len() <= 512);
            let cc = v["country"].as_str().unwrap();
            assert!(cc.len() == 2 && cc.bytes().all(|b| b.is_ascii_uppercase()));
            assert!(DEVICES.contains(&v["device"].as_str().unwrap()));
            let cost = v["cost_micros"].as_u64().unwrap();
            assert!((1..=1_000_000).contains(&cost));
        }
    }

    #[test]
    fn pooled_events_are_valid_unique_and_current() {
        let m = Mix {
            dup_share: 0.1,
            invalid_share: 0.05,
            late_share: 0.1,
            ..mix()
        };
        let mut g = EventGen::new(m, 9, 3);
        g.use_pool(64);
        let now = 1_764_201_600_123u64;
        let mut ids = HashSet::new();
        let (mut dups, mut invalid, mut late) = (0, 0, 0);
        let mut out = Vec::new();
        for _ in 0..5000 {
            out.clear();
            let k = g.write_event(&mut out, now);
            // Every broken form is still JSON; ids of invalid lines count as sent too.
            let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
            let id = v["event_id"].as_str().unwrap_or("").to_string();
            if k == Kind::Invalid {
                invalid += 1;
                if valid_uuid(id.as_bytes()) {
                    ids.insert(id);
                }
                continue;
            }
            assert!(valid_uuid(id.as_bytes()));
            let fresh = ids.insert(id);
            assert_eq!(fresh, k == Kind::Valid, "{k:?}");
            if k == Kind::Duplicate {
                dups += 1;
            }
            let ts = v["ts"].as_u64().unwrap();
            assert!(ts <= now && now - ts <= 3_600_000);
            if ts < now {
                late += 1;
            }
        }
        assert!(dups > 300 && dups < 700, "{dups}");
        assert!(invalid > 0 && late > 0);
    }

    #[test]
    fn shares_are_roughly_respected() {
        let m = Mix {
            dup_share: 0.1,
            invalid_share: 0.1,
            bot_share: 0.2,
            burst_ips: 3,
            burst_share: 0.5,
            ..mix()
        };
        let mut g = EventGen::new(m, 3, 2);
        let (mut dup, mut inv, mut bot, mut burst) = (0, 0, 0, 0);
        let mut out = Vec::new();
        let n = 20_000;
        for _ in 0..n {
            out.clear();
            let k = g.write_event(&mut out, 1_764_201_600_123);
            let s = std::str::from_utf8(&out).unwrap();
            match k {
                Kind::Duplicate => dup += 1,
                Kind::Invalid => inv += 1,
                Kind::Valid => {}
            }
            if k != Kind::Invalid {
                serde_json::from_str::<serde_json::Value>(s).expect("valid json");
            }
            if s.contains("bot") {
                bot += 1;
            }
            if s.contains("\"ip\":\"198.18.0.") {
                burst += 1;
            }
        }
        let near = |x: i32, p: f64| ((x as f64 / n as f64) - p).abs() < 0.02;
        assert!(near(dup, 0.09), "dup {dup}"); // invalid overrides some dups
        assert!(near(inv, 0.1), "inv {inv}");
        assert!(near(bot, 0.2), "bot {bot}");
        assert!(near(burst, 0.5), "burst {burst}");
    }
}

/// Generation speed, for profiling the tool's own ceiling:
/// `cargo test --release -p clickgate-bench --bins -- --ignored --nocapture gen_speed`
#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore]
    fn gen_speed() {
        let m = Mix {
            campaigns: 1000,
            zipf: 1.1,
            users: 100_000,
            dup_share: 0.0,
            invalid_share: 0.0,
            bot_share: 0.0,
            burst_ips: 0,
            burst_share: 0.5,
            late_share: 0.0,
        };
        for pool in [0usize, 1024, 65536] {
            let mut g = EventGen::new(m.clone(), 1, 1);
            if pool > 0 {
                g.use_pool(pool);
            }
            let mut out = Vec::with_capacity(1 << 20);
            let n = 2_000_000;
            let t = std::time::Instant::now();
            for i in 0..n {
                if i % 1000 == 0 {
                    out.clear();
                }
                g.write_event(&mut out, 1_764_201_600_123);
                out.push(b'\n');
            }
            let ns = t.elapsed().as_nanos() as f64 / n as f64;
            println!("pool {pool:>6}: {ns:.1} ns/event");
        }
    }
}
