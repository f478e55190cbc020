//! Sets of IPv4 and IPv6 networks (trusted publisher networks, IP blocklists).
//!
//! One hash set per distinct prefix length, over the masked address: a lookup costs one
//! hash probe per distinct length present (a handful in practice), whatever the number
//! of entries.
//!
//! IPv4 and IPv4-mapped IPv6 (`::ffff:a.b.c.d`) are the same host: a mapped address
//! matches IPv4 entries, and an entry written in mapped form (`::ffff:10.0.0.0/104`) is
//! stored as the IPv4 entry it denotes (`10.0.0.0/8`).

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::hash::mix64;

/// Longest item echoed back in an error: enough to find it in an operator's file.
const ERROR_ITEM_CHARS_MAX: usize = 80;

/// `::ffff:0:0/96`, the IPv4-mapped IPv6 range.
const MAPPED_NET: u128 = 0xffff_0000_0000;
const MAPPED_PREFIX: u8 = 96;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad CIDR \"{item}\": {reason}")]
pub struct CidrError {
    pub item: String,
    pub reason: String,
}

impl CidrError {
    fn new(item: &str, reason: impl Into<String>) -> Self {
        CidrError {
            item: item.chars().take(ERROR_ITEM_CHARS_MAX).collect(),
            reason: reason.into(),
        }
    }
}

/// A fixed hasher: addresses are already spread, they only need mixing. Deterministic,
/// so every core and every replay builds identical tables.
#[derive(Default, Clone, Copy)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        mix64(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = mix64(self.0 ^ u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.0 ^= v as u64;
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = mix64(self.0 ^ v as u64) ^ (v >> 64) as u64;
    }
}

type Set<T> = HashSet<T, BuildHasherDefault<MixHasher>>;

/// The netmask of an IPv4 prefix length (0..=32).
#[inline]
pub(crate) fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    }
}

/// The netmask of an IPv6 prefix length (0..=128).
#[inline]
pub(crate) fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix as u32)
    }
}

/// One network of a [`CidrSet`]: masked address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    V4(u32, u8),
    V6(u128, u8),
}

/// A set of IPv4 and IPv6 networks with exact prefix-match lookups.
#[derive(Debug, Clone, Default)]
pub struct CidrSet {
    /// Longest prefix first; each set holds masked network addresses.
    v4: Vec<(u8, Set<u32>)>,
    v6: Vec<(u8, Set<u128>)>,
    /// Some IPv6 entry shorter than /96 covers the whole IPv4-mapped range, so every
    /// IPv4 address matches.
    v6_covers_v4: bool,
}

impl CidrSet {
    /// Parses items such as `10.0.0.0/8`, `2001:db8::/32` or a bare address (a /32 or
    /// /128). Host bits below the prefix are ignored (`10.1.2.3/8` is `10.0.0.0/8`), as
    /// operator files often carry them. Surrounding whitespace is ignored.
    pub fn parse_list<S: AsRef<str>>(items: &[S]) -> Result<CidrSet, CidrError> {
        let mut set = CidrSet::default();
        for item in items {
            let item = item.as_ref();
            match parse_item(item)? {
                (IpAddr::V4(a), prefix) => set.insert_v4(u32::from(a), prefix),
                (IpAddr::V6(a), prefix) => set.insert_v6(u128::from(a), prefix),
            }
        }
        set.v4.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        set.v6.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        Ok(set)
    }

    fn insert_v4(&mut self, addr: u32, prefix: u8) {
        let net = addr & mask32(prefix);
        match self.v4.iter_mut().find(|(p, _)| *p == prefix) {
            Some((_, s)) => {
                s.insert(net);
            }
            None => {
                let mut s = Set::default();
                s.insert(net);
                self.v4.push((prefix, s));
            }
        }
    }

    fn insert_v6(&mut self, addr: u128, prefix: u8) {
        let mask = mask128(prefix);
        let mapped_mask = mask128(MAPPED_PREFIX);
        if prefix >= MAPPED_PREFIX && addr & mapped_mask == MAPPED_NET {
            return self.insert_v4(addr as u32, prefix - MAPPED_PREFIX);
        }
        if MAPPED_NET & mask == addr & mask {
            self.v6_covers_v4 = true;
        }
        let net = addr & mask;
        match self.v6.iter_mut().find(|(p, _)| *p == prefix) {
            Some((_, s)) => {
                s.insert(net);
            }
            None => {
                let mut s = Set::default();
                s.insert(net);
                self.v6.push((prefix, s));
            }
        }
    }

    /// True when some entry covers `ip`. An IPv4-mapped IPv6 address matches as the IPv4
    /// address it carries.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.contains_v4(a),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => self.contains_v4(v4),
                None => self.contains_v6(a),
            },
        }
    }

    fn contains_v4(&self, a: Ipv4Addr) -> bool {
        let a = u32::from(a);
        self.v6_covers_v4 || self.v4.iter().any(|(p, s)| s.contains(&(a & mask32(*p))))
    }

    fn contains_v6(&self, a: Ipv6Addr) -> bool {
        let a = u128::from(a);
        self.v6.iter().any(|(p, s)| s.contains(&(a & mask128(*p))))
    }

    /// Every network held, for pre-filters built in front of the set (the fraud
    /// blocklist's bloom): IPv4 entries (mapped ones included) as `V4(net, prefix)`,
    /// the rest as `V6(net, prefix)`, network addresses already masked.
    pub fn networks(&self) -> impl Iterator<Item = Network> + '_ {
        let v4 = self
            .v4
            .iter()
            .flat_map(|(p, s)| s.iter().map(move |&n| Network::V4(n, *p)));
        let v6 = self
            .v6
            .iter()
            .flat_map(|(p, s)| s.iter().map(move |&n| Network::V6(n, *p)));
        v4.chain(v6)
    }

    /// True when an IPv6 entry shorter than /96 covers the IPv4-mapped range, so every
    /// IPv4 address is in the set whatever its IPv4 entries.
    pub fn covers_all_ipv4(&self) -> bool {
        self.v6_covers_v4
    }

    /// Distinct networks held (duplicates and entries that differ only in host bits
    /// count once).
    pub fn len(&self) -> usize {
        self.v4.iter().map(|(_, s)| s.len()).sum::<usize>()
            + self.v6.iter().map(|(_, s)| s.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

fn parse_item(item: &str) -> Result<(IpAddr, u8), CidrError> {
    let text = item.trim();
    if text.is_empty() {
        return Err(CidrError::new(item, "empty entry"));
    }
    let (addr_text, prefix_text) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr: IpAddr = addr_text
        .parse()
        .map_err(|_| CidrError::new(item, "not an IPv4 or IPv6 address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix_text {
        None => max,
        Some(p) => {
            // u8::from_str would take "+8"; only plain digits are a prefix length.
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CidrError::new(
                    item,
                    "prefix length must be a decimal number",
                ));
            }
            let n: u16 = p
                .parse()
                .map_err(|_| CidrError::new(item, "prefix length must be a decimal number"))?;
            if n > max as u16 {
                let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
                return Err(CidrError::new(
                    item,
                    format!("prefix length {n} exceeds {max} for {family}"),
                ));
            }
            n as u8
        }
    };
    Ok((addr, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(items: &[&str]) -> CidrSet {
        CidrSet::parse_list(items).expect("valid list")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    /// `(address, expected)` against one set.
    fn check(s: &CidrSet, cases: &[(&str, bool)]) {
        for (a, expected) in cases {
            assert_eq!(s.contains(ip(a)), *expected, "{a}");
        }
    }

    #[test]
    fn ipv4_edges() {
        let s = set(&["198.51.100.0/24", "10.0.0.0/8", "192.0.2.7"]);
        assert_eq!(s.len(), 3);
        check(
            &s,
            &[
                ("198.51.100.0", true),
                ("198.51.100.255", true),
                ("198.51.99.255", false),
                ("198.51.101.0", false),
                ("10.0.0.0", true),
                ("10.255.255.255", true),
                ("9.255.255.255", false),
                ("11.0.0.0", false),
                ("192.0.2.7", true),
                ("192.0.2.6", false),
                ("192.0.2.8", false),
                ("::ffff:10.1.2.3", true),
                ("::ffff:11.1.2.3", false),
                ("::10.1.2.3", false),
                ("2001:db8::1", false),
            ],
        );
    }

    #[test]
    fn ipv6_edges() {
        let s = set(&["2001:db8::/32", "2001:db8:ffff::1/128", "fe80::/10"]);
        check(
            &s,
            &[
                ("2001:db8::", true),
                ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", true),
                ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", false),
                ("2001:db9::", false),
                ("fe80::1", true),
                ("febf:ffff::1", true),
                ("fec0::", false),
                ("10.0.0.1", false),
            ],
        );
        let one = set(&["2001:db8::5/128"]);
        check(
            &one,
            &[
                ("2001:db8::5", true),
                ("2001:db8::4", false),
                ("2001:db8::6", false),
            ],
        );
        let bare = set(&["2001:db8::5"]);
        check(&bare, &[("2001:db8::5", true), ("2001:db8::6", false)]);
    }

    #[test]
    fn zero_prefixes_cover_their_family() {
        let v4 = set(&["0.0.0.0/0"]);
        check(
            &v4,
            &[
                ("0.0.0.0", true),
                ("255.255.255.255", true),
                ("::ffff:1.2.3.4", true),
            ],
        );
        check(&v4, &[("::1", false), ("2001:db8::1", false)]);
        let v6 = set(&["::/0"]);
        check(
            &v6,
            &[("::", true), ("2001:db8::1", true), ("1.2.3.4", true)],
        );
        let s = set(&["1.2.3.4/32"]);
        check(
            &s,
            &[("1.2.3.4", true), ("1.2.3.3", false), ("1.2.3.5", false)],
        );
    }

    #[test]
    fn mapped_entries_are_ipv4_entries() {
        let s = set(&["::ffff:10.0.0.0/104"]);
        assert_eq!(s.len(), 1);
        check(
            &s,
            &[
                ("10.9.9.9", true),
                ("::ffff:10.9.9.9", true),
                ("11.0.0.0", false),
            ],
        );
        let both = set(&["::ffff:10.0.0.0/104", "10.0.0.0/8"]);
        assert_eq!(both.len(), 1);
    }

    #[test]
    fn host_bits_and_whitespace_are_accepted() {
        let s = set(&[" 10.1.2.3/8 ", "10.0.0.0/8", "2001:db8::1/32"]);
        assert_eq!(s.len(), 2);
        check(&s, &[("10.200.0.1", true), ("2001:db8:1::", true)]);
    }

    #[test]
    fn junk_is_refused_with_the_item_named() {
        for bad in [
            "",
            "  ",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/8/8",
            "10.0.0.0/-1",
            "10.0.0.0/ 8",
            "hello",
            "10.0.0.0/0008",
            "2001:db8::/64x",
            "1.2.3.4:80",
        ] {
            let e = CidrSet::parse_list(&["1.1.1.1", bad]).expect_err(bad);
            assert_eq!(e.item, bad);
            assert!(
                e.to_string().starts_with(&format!("bad CIDR \"{bad}\": ")),
                "{e}"
            );
        }
        let e = CidrSet::parse_list(&["10.0.0.0/33"]).expect_err("too long");
        assert_eq!(e.reason, "prefix length 33 exceeds 32 for IPv4");
    }

    #[test]
    fn empty_set_contains_nothing() {
        let s = CidrSet::parse_list::<&str>(&[]).expect("empty list");
        assert!(s.is_empty());
        assert_eq!(s.len(), 0);
        assert!(!s.contains(ip("1.2.3.4")));
        assert!(!s.contains(ip("::")));
    }

    /// The reference: everything in IPv6 space (IPv4 as mapped), checked linearly.
    fn canonical(a: IpAddr) -> u128 {
        match a {
            IpAddr::V4(v4) => MAPPED_NET | u32::from(v4) as u128,
            IpAddr::V6(v6) => u128::from(v6),
        }
    }

    fn naive_contains(entries: &[(IpAddr, u8)], a: IpAddr) -> bool {
        let a = canonical(a);
        entries.iter().any(|&(net, p)| {
            let p = if net.is_ipv4() { p + 96 } else { p };
            canonical(net) & mask128(p) == a & mask128(p)
        })
    }

    fn arb_addr() -> impl Strategy<Value = IpAddr> {
        // Addresses clustered around a few bases so that prefixes actually hit.
        let v4 = (0usize..3, any::<u32>(), 0u32..32).prop_map(|(b, noise, bits)| {
            let base = [0x0a00_0000u32, 0xc633_6400, 0xffff_ffff][b];
            IpAddr::V4(Ipv4Addr::from(base ^ (noise >> bits)))
        });
        let v6 = (0usize..4, any::<u128>(), 0u32..128).prop_map(|(b, noise, bits)| {
            let base = [
                0x2001_0db8u128 << 96,
                MAPPED_NET | 0x0a00_0000,
                0,
                u128::MAX,
            ][b];
            IpAddr::V6(Ipv6Addr::from(base ^ (noise >> bits)))
        });
        prop_oneof![v4, v6]
    }

    fn arb_entry() -> impl Strategy<Value = (IpAddr, u8)> {
        (arb_addr(), 0u8..=128).prop_map(|(a, p)| (a, if a.is_ipv4() { p % 33 } else { p }))
    }

    proptest! {
        #[test]
        fn matches_the_naive_reference(
            entries in proptest::collection::vec(arb_entry(), 0..12),
            probes in proptest::collection::vec(arb_addr(), 1..32),
        ) {
            let items: Vec<String> = entries.iter().map(|(a, p)| format!("{a}/{p}")).collect();
            let s = CidrSet::parse_list(&items).expect("generated entries are valid");
            for a in probes.iter().copied().chain(entries.iter().map(|e| e.0)) {
                prop_assert_eq!(s.contains(a), naive_contains(&entries, a), "{:?} {}", items, a);
            }
        }

        #[test]
        fn never_panics_on_junk(item in "[0-9a-f:./ +\\-]{0,48}") {
            let _ = CidrSet::parse_list(&[item]);
        }
    }
}
