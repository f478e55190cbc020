//! The IP blocklist: exact prefix sets fronted by a bloom filter (measured slower than
//! [`CidrSet`] alone; kept for the comparison).

use std::net::IpAddr;

use crate::bloom::{bloom_params, BloomFilter};
use crate::cidr::{mask128, mask32, CidrSet, Network};
use crate::hash::mix64;

use super::*;

#[inline]
fn key_v4(net: u32, prefix: u8) -> u64 {
    mix64(((net as u64) << 8) | prefix as u64)
}

#[inline]
fn key_v6(net: u128, prefix: u8) -> u64 {
    mix64((net as u64) ^ mix64((net >> 64) as u64 ^ ((prefix as u64 + 1) << 56)))
}

/// An IP/CIDR blocklist: per prefix length present, one bloom probe of the masked
/// address; only a bloom hit pays for the exact [`CidrSet`] lookup.
///
/// Measured against the exact set alone (`bench/benches/fraud.rs`, 10k networks over
/// four prefix lengths), the pre-check loses: a bloom probe per length (two mixes and
/// ~2 bit reads) costs more than the hash-set probe it would save, since `CidrSet`
/// already costs one probe per distinct length whatever the number of networks. The
/// compiled rules therefore use `CidrSet` directly; this type is kept, tested against
/// the same reference, for the comparison and for sets with many long, sparse lengths.
#[derive(Clone, Debug)]
pub struct IpBlocklist {
    exact: CidrSet,
    bloom: BloomFilter,
    /// Distinct prefix lengths, longest first.
    v4_lens: Vec<u8>,
    v6_lens: Vec<u8>,
    all_v4: bool,
}

impl IpBlocklist {
    pub fn new(exact: CidrSet) -> IpBlocklist {
        let mut bloom = BloomFilter::new(bloom_params(exact.len() as u64, BLOCKLIST_BLOOM_FP));
        let (mut v4_lens, mut v6_lens) = (Vec::new(), Vec::new());
        for n in exact.networks() {
            match n {
                Network::V4(net, p) => {
                    bloom.insert(key_v4(net, p));
                    if !v4_lens.contains(&p) {
                        v4_lens.push(p);
                    }
                }
                Network::V6(net, p) => {
                    bloom.insert(key_v6(net, p));
                    if !v6_lens.contains(&p) {
                        v6_lens.push(p);
                    }
                }
            }
        }
        v4_lens.sort_unstable_by(|a, b| b.cmp(a));
        v6_lens.sort_unstable_by(|a, b| b.cmp(a));
        IpBlocklist {
            all_v4: exact.covers_all_ipv4(),
            exact,
            bloom,
            v4_lens,
            v6_lens,
        }
    }

    pub fn parse_list<S: AsRef<str>>(items: &[S]) -> Result<IpBlocklist, crate::cidr::CidrError> {
        CidrSet::parse_list(items).map(IpBlocklist::new)
    }

    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let v4 = match ip {
            IpAddr::V4(a) => Some(u32::from(a)),
            IpAddr::V6(a) => a.to_ipv4_mapped().map(u32::from),
        };
        let maybe = match (v4, ip) {
            (Some(_), _) if self.all_v4 => true,
            (Some(a), _) => self
                .v4_lens
                .iter()
                .any(|&p| self.bloom.contains(key_v4(a & mask32(p), p))),
            (None, IpAddr::V6(a)) => {
                let a = u128::from(a);
                self.v6_lens
                    .iter()
                    .any(|&p| self.bloom.contains(key_v6(a & mask128(p), p)))
            }
            (None, IpAddr::V4(_)) => unreachable!("IPv4 always has a v4 form"),
        };
        maybe && self.exact.contains(ip)
    }

    pub fn len(&self) -> usize {
        self.exact.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty()
    }
}
