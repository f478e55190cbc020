//! The raw record: one accepted event plus the dataplane's decisions about it.
//!
//! Layout (version 1, integers little-endian), chosen so encoding is a handful of copies
//! into a caller-owned buffer and decoding borrows from it:
//!
//! ```text
//! u8   version (=1)
//! u8   flags (bit 0 duplicate, bit 1 fraud)
//! u64  recv_ms          receive time at the dataplane, ms since epoch
//! [16] event_id
//! u64  ts_ms, campaign_id, ad_id, publisher_id, advertiser_id, cost_micros
//! u8   ip family (4 | 6) then 4 | 16 address bytes
//! [2]  country
//! u8   device
//! u8   user_id length, bytes
//! u16  user_agent length, bytes
//! u8   fired rule count, then per rule: u8 length, bytes (rule ids)
//! ```

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clickgate_core::event::{USER_AGENT_BYTES_MAX, USER_ID_BYTES_MAX};
use clickgate_core::{Click, Device, EventId};

pub const RECORD_VERSION: u8 = 1;
/// Fired rule ids kept per record, at most.
pub const RULES_PER_RECORD_MAX: usize = 16;
/// Length of a rule id, at most.
pub const RULE_ID_BYTES_MAX: usize = 64;
/// The largest encoded record: fixed part + longest strings + rule ids.
pub const RECORD_BYTES_MAX: usize = 2
    + 8
    + 16
    + 6 * 8
    + 1
    + 16
    + 2
    + 1
    + 1
    + USER_ID_BYTES_MAX
    + 2
    + USER_AGENT_BYTES_MAX
    + 1
    + RULES_PER_RECORD_MAX * (1 + RULE_ID_BYTES_MAX);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags(pub u8);

impl Flags {
    pub const DUPLICATE: u8 = 1;
    pub const FRAUD: u8 = 2;

    pub fn duplicate(self) -> bool {
        self.0 & Self::DUPLICATE != 0
    }
    pub fn fraud(self) -> bool {
        self.0 & Self::FRAUD != 0
    }
    pub fn with_duplicate(self, on: bool) -> Flags {
        Flags(if on {
            self.0 | Self::DUPLICATE
        } else {
            self.0 & !Self::DUPLICATE
        })
    }
    pub fn with_fraud(self, on: bool) -> Flags {
        Flags(if on {
            self.0 | Self::FRAUD
        } else {
            self.0 & !Self::FRAUD
        })
    }
}

/// A decoded raw record; borrows its strings from the encoded bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord<'a> {
    pub flags: Flags,
    pub recv_ms: u64,
    pub click: Click<'a>,
    /// Ids of the fraud rules that fired, in evaluation order.
    pub rules: Vec<&'a str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    #[error("record truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("bad ip family {0}")]
    IpFamily(u8),
    #[error("bad device {0}")]
    Device(u8),
    #[error("string is not UTF-8 at byte {0}")]
    Utf8(usize),
    #[error("more than {RULES_PER_RECORD_MAX} rules or a rule id over {RULE_ID_BYTES_MAX} bytes")]
    Rules,
    /// A string longer than the encoder writes (`user_id`, `user_agent`).
    #[error("{0} is over its bound")]
    TooLong(&'static str),
    /// A `raw_clicks` protobuf value that is malformed or out of bounds (`raw_pb`).
    #[error("protobuf value: {0}")]
    Protobuf(&'static str),
}

/// The exact encoded size of a record, so a caller can reserve space before encoding.
pub fn encoded_len(click: &Click<'_>, rules: &[&str]) -> usize {
    let ip = match click.ip {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 16,
    };
    2 + 8
        + 16
        + 6 * 8
        + 1
        + ip
        + 2
        + 1
        + 1
        + click.user_id.len()
        + 2
        + click.user_agent.len()
        + 1
        + rules.iter().map(|r| 1 + r.len()).sum::<usize>()
}

/// Encodes into `out`, which must be exactly `encoded_len` bytes long.
/// Returns `Err(RecordError::Rules)` when the rule list is over its bounds; a validated
/// click never exceeds its string bounds.
pub fn encode_into(
    click: &Click<'_>,
    flags: Flags,
    recv_ms: u64,
    rules: &[&str],
    out: &mut [u8],
) -> Result<(), RecordError> {
    if rules.len() > RULES_PER_RECORD_MAX || rules.iter().any(|r| r.len() > RULE_ID_BYTES_MAX) {
        return Err(RecordError::Rules);
    }
    assert_eq!(
        out.len(),
        encoded_len(click, rules),
        "encode_into: buffer size"
    );
    assert!(click.user_id.len() <= u8::MAX as usize && click.user_agent.len() <= u16::MAX as usize);
    let mut w = Writer { out, at: 0 };
    w.put(&[RECORD_VERSION, flags.0]);
    w.put(&recv_ms.to_le_bytes());
    w.put(&click.event_id.0);
    for v in [
        click.ts_ms,
        click.campaign_id,
        click.ad_id,
        click.publisher_id,
        click.advertiser_id,
        click.cost_micros,
    ] {
        w.put(&v.to_le_bytes());
    }
    match click.ip {
        IpAddr::V4(a) => {
            w.put(&[4]);
            w.put(&a.octets());
        }
        IpAddr::V6(a) => {
            w.put(&[6]);
            w.put(&a.octets());
        }
    }
    w.put(&click.country);
    w.put(&[click.device as u8]);
    w.put(&[click.user_id.len() as u8]);
    w.put(click.user_id.as_bytes());
    w.put(&(click.user_agent.len() as u16).to_le_bytes());
    w.put(click.user_agent.as_bytes());
    w.put(&[rules.len() as u8]);
    for r in rules {
        w.put(&[r.len() as u8]);
        w.put(r.as_bytes());
    }
    debug_assert_eq!(w.at, w.out.len());
    Ok(())
}

/// Encodes by appending to a vector (convenience for tests and the batch paths).
pub fn encode(
    click: &Click<'_>,
    flags: Flags,
    recv_ms: u64,
    rules: &[&str],
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    let start = out.len();
    out.resize(start + encoded_len(click, rules), 0);
    let r = encode_into(click, flags, recv_ms, rules, &mut out[start..]);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

/// Decodes one record that spans all of `bytes`.
pub fn decode(bytes: &[u8]) -> Result<RawRecord<'_>, RecordError> {
    let mut r = Reader { b: bytes, at: 0 };
    let version = r.u8()?;
    if version != RECORD_VERSION {
        return Err(RecordError::Version(version));
    }
    let flags = Flags(r.u8()?);
    let recv_ms = r.u64()?;
    let event_id = EventId(r.take(16)?.try_into().expect("16 bytes"));
    let ts_ms = r.u64()?;
    let campaign_id = r.u64()?;
    let ad_id = r.u64()?;
    let publisher_id = r.u64()?;
    let advertiser_id = r.u64()?;
    let cost_micros = r.u64()?;
    let ip = match r.u8()? {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(r.take(4)?).expect("4"))),
        6 => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(r.take(16)?).expect("16"),
        )),
        f => return Err(RecordError::IpFamily(f)),
    };
    let country: [u8; 2] = r.take(2)?.try_into().expect("2 bytes");
    let d = r.u8()?;
    let device = Device::from_u8(d).ok_or(RecordError::Device(d))?;
    // Every bound the encoder (and the protobuf decoder) keeps, so a record that decodes
    // re-encodes in either form.
    let n = r.u8()? as usize;
    if n > USER_ID_BYTES_MAX {
        return Err(RecordError::TooLong("user_id"));
    }
    let user_id = r.str(n)?;
    let n = u16::from_le_bytes(r.take(2)?.try_into().expect("2")) as usize;
    if n > USER_AGENT_BYTES_MAX {
        return Err(RecordError::TooLong("user_agent"));
    }
    let user_agent = r.str(n)?;
    let count = r.u8()? as usize;
    if count > RULES_PER_RECORD_MAX {
        return Err(RecordError::Rules);
    }
    let mut rules = Vec::with_capacity(count);
    for _ in 0..count {
        let n = r.u8()? as usize;
        if n > RULE_ID_BYTES_MAX {
            return Err(RecordError::Rules);
        }
        rules.push(r.str(n)?);
    }
    if r.at != bytes.len() {
        return Err(RecordError::Truncated(r.at));
    }
    Ok(RawRecord {
        flags,
        recv_ms,
        click: Click {
            event_id,
            ts_ms,
            campaign_id,
            ad_id,
            publisher_id,
            advertiser_id,
            user_id: Cow::Borrowed(user_id),
            ip,
            user_agent: Cow::Borrowed(user_agent),
            country,
            device,
            cost_micros,
        },
        rules,
    })
}

struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    #[inline]
    fn put(&mut self, b: &[u8]) {
        self.out[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(RecordError::Truncated(self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn str(&mut self, n: usize) -> Result<&'a str, RecordError> {
        let at = self.at;
        std::str::from_utf8(self.take(n)?).map_err(|_| RecordError::Utf8(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(ip: IpAddr, uid: &str, ua: &str) -> Click<'static> {
        Click {
            event_id: EventId::parse("6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f").unwrap(),
            ts_ms: 1_764_201_600_123,
            campaign_id: 12345,
            ad_id: 678,
            publisher_id: 42,
            advertiser_id: 7,
            user_id: Cow::Owned(uid.to_string()),
            ip,
            user_agent: Cow::Owned(ua.to_string()),
            country: *b"US",
            device: Device::Mobile,
            cost_micros: 500_000,
        }
    }

    #[test]
    fn round_trips_v4_and_v6_with_rules() {
        for ip in [
            "203.0.113.7".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ] {
            let c = sample(ip, "u-88121", "Mozilla/5.0");
            let mut buf = Vec::new();
            encode(
                &c,
                Flags::default().with_duplicate(true),
                99,
                &["bots", "burst"],
                &mut buf,
            )
            .unwrap();
            assert_eq!(buf.len(), encoded_len(&c, &["bots", "burst"]));
            let r = decode(&buf).unwrap();
            assert_eq!(r.click, c);
            assert!(r.flags.duplicate() && !r.flags.fraud());
            assert_eq!(r.recv_ms, 99);
            assert_eq!(r.rules, vec!["bots", "burst"]);
        }
    }

    #[test]
    fn rejects_too_many_rules() {
        let c = sample("1.2.3.4".parse().unwrap(), "u", "");
        let rules = vec!["r"; RULES_PER_RECORD_MAX + 1];
        let mut buf = Vec::new();
        assert_eq!(
            encode(&c, Flags::default(), 0, &rules, &mut buf),
            Err(RecordError::Rules)
        );
        assert!(buf.is_empty());
    }

    /// Found by the `raw_record` fuzz target: a record with a string over its bound
    /// decoded, but its protobuf value did not (user_id) or it did not re-encode (rule id).
    #[test]
    fn strings_over_their_bounds_do_not_decode() {
        let c = sample("1.2.3.4".parse().unwrap(), "u", "a");
        let mut buf = Vec::new();
        encode(&c, Flags::default(), 0, &["r"], &mut buf).unwrap();
        let uid_at = 2 + 8 + 16 + 6 * 8 + 1 + 4 + 2 + 1;
        assert_eq!(&buf[uid_at..uid_at + 2], &[1, b'u']);
        let mut long_uid = buf[..uid_at].to_vec();
        long_uid.push(USER_ID_BYTES_MAX as u8 + 1);
        long_uid.extend(std::iter::repeat_n(b'u', USER_ID_BYTES_MAX + 1));
        long_uid.extend_from_slice(&buf[uid_at + 2..]);
        assert_eq!(decode(&long_uid), Err(RecordError::TooLong("user_id")));
        let ua_at = uid_at + 2;
        let mut long_ua = buf[..ua_at].to_vec();
        long_ua.extend_from_slice(&(USER_AGENT_BYTES_MAX as u16 + 1).to_le_bytes());
        long_ua.extend(std::iter::repeat_n(b'a', USER_AGENT_BYTES_MAX + 1));
        long_ua.extend_from_slice(&buf[ua_at + 3..]);
        assert_eq!(decode(&long_ua), Err(RecordError::TooLong("user_agent")));
        let mut long_rule = buf[..buf.len() - 2].to_vec();
        long_rule.push(RULE_ID_BYTES_MAX as u8 + 1);
        long_rule.extend(std::iter::repeat_n(b'r', RULE_ID_BYTES_MAX + 1));
        assert_eq!(decode(&long_rule), Err(RecordError::Rules));
        // At the bounds, they still decode.
        let at = sample(
            c.ip,
            &"u".repeat(USER_ID_BYTES_MAX),
            &"a".repeat(USER_AGENT_BYTES_MAX),
        );
        let rule = "r".repeat(RULE_ID_BYTES_MAX);
        let mut ok = Vec::new();
        encode(&at, Flags::default(), 0, &[rule.as_str()], &mut ok).unwrap();
        assert_eq!(decode(&ok).unwrap().click, at);
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn truncation_is_an_error(cut in 0usize..90) {
            let c = sample("1.2.3.4".parse().unwrap(), "user", "agent");
            let mut buf = Vec::new();
            encode(&c, Flags::default(), 1, &[], &mut buf).unwrap();
            let cut = cut.min(buf.len() - 1);
            prop_assert!(decode(&buf[..cut]).is_err());
        }
    }
}
