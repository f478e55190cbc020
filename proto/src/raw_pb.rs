//! The `raw_clicks` value as Protocol Buffers: message `clickgate.raw.v1.RawClick` of
//! `proto/clickgate/raw/v1/raw_click.proto`, encoded and decoded by hand (a few varints
//! and length-delimited fields: no code generator, no allocation, strings borrowed).
//!
//! The local log keeps its own layout ([`crate::record`]); the forwarder turns each log
//! record into this value with [`from_log_record`]. [`decode_value`] reads either form:
//! a log record starts with its version byte 1, which no protobuf message can start with
//! (it would be field number 0), so the two never mix up.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clickgate_core::event::{USER_AGENT_BYTES_MAX, USER_ID_BYTES_MAX};
use clickgate_core::{Click, Device, EventId};

use crate::record::{
    self, Flags, RawRecord, RecordError, RECORD_VERSION, RULES_PER_RECORD_MAX, RULE_ID_BYTES_MAX,
};

const F_EVENT_ID: u32 = 1;
const F_TS_MS: u32 = 2;
const F_RECV_MS: u32 = 3;
const F_CAMPAIGN_ID: u32 = 4;
const F_AD_ID: u32 = 5;
const F_PUBLISHER_ID: u32 = 6;
const F_ADVERTISER_ID: u32 = 7;
const F_COST_MICROS: u32 = 8;
const F_IP: u32 = 9;
const F_COUNTRY: u32 = 10;
const F_DEVICE: u32 = 11;
const F_USER_ID: u32 = 12;
const F_USER_AGENT: u32 = 13;
const F_DUPLICATE: u32 = 14;
const F_FRAUD: u32 = 15;
const F_RULES: u32 = 16;

const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;
const I32: u32 = 5;

/// The largest encoded value (every field at its longest), for buffer bounds.
pub const VALUE_BYTES_MAX: usize = 18
    + 7 * 11
    + 18
    + 4
    + 2
    + 2
    + USER_ID_BYTES_MAX
    + 3
    + USER_AGENT_BYTES_MAX
    + 3
    + 4
    + RULES_PER_RECORD_MAX * (3 + RULE_ID_BYTES_MAX);

#[inline]
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline]
fn put_tag(out: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(out, u64::from(field << 3 | wire));
}

#[inline]
fn put_u64(out: &mut Vec<u8>, field: u32, v: u64) {
    // proto3: a default (zero) value is not written.
    if v != 0 {
        put_tag(out, field, VARINT);
        put_varint(out, v);
    }
}

#[inline]
fn put_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    if !b.is_empty() {
        put_tag(out, field, LEN);
        put_varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }
}

/// Appends the protobuf value of `r` to `out`.
pub fn encode(r: &RawRecord<'_>, out: &mut Vec<u8>) {
    let c = &r.click;
    out.reserve(128 + c.user_agent.len());
    put_bytes(out, F_EVENT_ID, &c.event_id.0);
    put_u64(out, F_TS_MS, c.ts_ms);
    put_u64(out, F_RECV_MS, r.recv_ms);
    put_u64(out, F_CAMPAIGN_ID, c.campaign_id);
    put_u64(out, F_AD_ID, c.ad_id);
    put_u64(out, F_PUBLISHER_ID, c.publisher_id);
    put_u64(out, F_ADVERTISER_ID, c.advertiser_id);
    put_u64(out, F_COST_MICROS, c.cost_micros);
    match c.ip {
        IpAddr::V4(a) => put_bytes(out, F_IP, &a.octets()),
        IpAddr::V6(a) => put_bytes(out, F_IP, &a.octets()),
    }
    put_bytes(out, F_COUNTRY, &c.country);
    put_u64(out, F_DEVICE, c.device as u64 + 1);
    put_bytes(out, F_USER_ID, c.user_id.as_bytes());
    put_bytes(out, F_USER_AGENT, c.user_agent.as_bytes());
    put_u64(out, F_DUPLICATE, u64::from(r.flags.duplicate()));
    put_u64(out, F_FRAUD, u64::from(r.flags.fraud()));
    for id in &r.rules {
        // A repeated field writes every element, empty ones too.
        put_tag(out, F_RULES, LEN);
        put_varint(out, id.len() as u64);
        out.extend_from_slice(id.as_bytes());
    }
}

/// The Kafka value of a local-log record: `out` is cleared and holds the protobuf
/// encoding of `log_record` (the forwarder's one call per record).
pub fn from_log_record(log_record: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
    let r = record::decode(log_record)?;
    out.clear();
    encode(&r, out);
    Ok(())
}

/// Reads a record in either form: the local log's layout (first byte = its version) or
/// a `raw_clicks` protobuf value.
#[inline]
pub fn decode_value(bytes: &[u8]) -> Result<RawRecord<'_>, RecordError> {
    match bytes.first() {
        Some(&RECORD_VERSION) => record::decode(bytes),
        _ => decode(bytes),
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

fn bad(what: &'static str) -> RecordError {
    RecordError::Protobuf(what)
}

impl<'a> Reader<'a> {
    #[inline]
    fn varint(&mut self) -> Result<u64, RecordError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.b.get(self.at) else {
                return Err(bad("truncated varint"));
            };
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(bad("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], RecordError> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&e| e <= self.b.len())
            .ok_or(bad("field runs past the end"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn skip(&mut self, wire: u32) -> Result<(), RecordError> {
        match wire {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            LEN => {
                let n = self.varint()?;
                self.take(n).map(drop)
            }
            I32 => self.take(4).map(drop),
            _ => Err(bad("unknown wire type")),
        }
    }
}

fn utf8<'a>(b: &'a [u8], what: &'static str) -> Result<&'a str, RecordError> {
    std::str::from_utf8(b).map_err(|_| bad(what))
}

/// Decodes a `RawClick` value. Unknown fields are skipped; a missing or malformed
/// required field (event id, IP, country, device) and every bound of the local log's
/// record (string lengths, rule count) is an error naming it.
pub fn decode(bytes: &[u8]) -> Result<RawRecord<'_>, RecordError> {
    let mut r = Reader { b: bytes, at: 0 };
    let mut event_id = None;
    let (mut ts_ms, mut recv_ms, mut campaign_id, mut ad_id) = (0, 0, 0, 0);
    let (mut publisher_id, mut advertiser_id, mut cost_micros) = (0, 0, 0);
    let mut ip = None;
    let mut country = None;
    let mut device = None;
    let (mut user_id, mut user_agent) = ("", "");
    let mut flags = Flags::default();
    let mut rules: Vec<&str> = Vec::new();
    while r.at < bytes.len() {
        let tag = r.varint()?;
        let (field, wire) = ((tag >> 3) as u32, (tag & 7) as u32);
        if field == 0 {
            return Err(bad("field number 0"));
        }
        let want = match field {
            F_EVENT_ID | F_IP | F_COUNTRY | F_USER_ID | F_USER_AGENT | F_RULES => LEN,
            F_TS_MS..=F_COST_MICROS | F_DEVICE | F_DUPLICATE | F_FRAUD => VARINT,
            _ => {
                r.skip(wire)?;
                continue;
            }
        };
        if wire != want {
            return Err(bad("a known field has the wrong wire type"));
        }
        if want == VARINT {
            let v = r.varint()?;
            match field {
                F_TS_MS => ts_ms = v,
                F_RECV_MS => recv_ms = v,
                F_CAMPAIGN_ID => campaign_id = v,
                F_AD_ID => ad_id = v,
                F_PUBLISHER_ID => publisher_id = v,
                F_ADVERTISER_ID => advertiser_id = v,
                F_COST_MICROS => cost_micros = v,
                F_DEVICE => {
                    let d = v
                        .checked_sub(1)
                        .and_then(|d| u8::try_from(d).ok())
                        .and_then(Device::from_u8)
                        .ok_or(bad("device is not one of the Device values"))?;
                    device = Some(d);
                }
                F_DUPLICATE => flags = flags.with_duplicate(v != 0),
                _ => flags = flags.with_fraud(v != 0),
            }
            continue;
        }
        let n = r.varint()?;
        let b = r.take(n)?;
        match field {
            F_EVENT_ID => {
                let id: [u8; 16] = b.try_into().map_err(|_| bad("event_id is not 16 bytes"))?;
                event_id = Some(EventId(id));
            }
            F_IP => {
                ip = Some(match b.len() {
                    4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).expect("4"))),
                    16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16"))),
                    _ => return Err(bad("ip is neither 4 nor 16 bytes")),
                });
            }
            F_COUNTRY => {
                country = Some(<[u8; 2]>::try_from(b).map_err(|_| bad("country is not 2 bytes"))?)
            }
            F_USER_ID => {
                if b.len() > USER_ID_BYTES_MAX {
                    return Err(bad("user_id is too long"));
                }
                user_id = utf8(b, "user_id is not UTF-8")?;
            }
            F_USER_AGENT => {
                if b.len() > USER_AGENT_BYTES_MAX {
                    return Err(bad("user_agent is too long"));
                }
                user_agent = utf8(b, "user_agent is not UTF-8")?;
            }
            _ => {
                if rules.len() >= RULES_PER_RECORD_MAX || b.len() > RULE_ID_BYTES_MAX {
                    return Err(RecordError::Rules);
                }
                rules.push(utf8(b, "a rule id is not UTF-8")?);
            }
        }
    }
    Ok(RawRecord {
        flags,
        recv_ms,
        click: Click {
            event_id: event_id.ok_or(bad("event_id is missing"))?,
            ts_ms,
            campaign_id,
            ad_id,
            publisher_id,
            advertiser_id,
            user_id: Cow::Borrowed(user_id),
            ip: ip.ok_or(bad("ip is missing"))?,
            user_agent: Cow::Borrowed(user_agent),
            country: country.ok_or(bad("country is missing"))?,
            device: device.ok_or(bad("device is missing"))?,
            cost_micros,
        },
        rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(ip: &str, rules: Vec<&'static str>, flags: Flags) -> RawRecord<'static> {
        RawRecord {
            flags,
            recv_ms: 1_764_201_600_200,
            click: Click {
                event_id: EventId::parse("6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f").unwrap(),
                ts_ms: 1_764_201_600_123,
                campaign_id: 12345,
                ad_id: 0,
                publisher_id: 42,
                advertiser_id: 7,
                user_id: Cow::Borrowed("u-88121"),
                ip: ip.parse().unwrap(),
                user_agent: Cow::Borrowed("Mozilla/5.0"),
                country: *b"US",
                device: Device::Ctv,
                cost_micros: 500_000,
            },
            rules,
        }
    }

    #[test]
    fn round_trips_and_reads_either_form() {
        for (ip, rules, flags) in [
            ("203.0.113.7", vec![], Flags::default()),
            (
                "2001:db8::1",
                vec!["bots", ""],
                Flags::default().with_duplicate(true).with_fraud(true),
            ),
        ] {
            let r = sample(ip, rules, flags);
            let mut pb = Vec::new();
            encode(&r, &mut pb);
            assert!(pb.len() <= VALUE_BYTES_MAX);
            assert_eq!(decode(&pb).unwrap(), r);
            assert_eq!(decode_value(&pb).unwrap(), r);
            let mut log = Vec::new();
            record::encode(&r.click, r.flags, r.recv_ms, &r.rules, &mut log).unwrap();
            assert_eq!(decode_value(&log).unwrap(), r);
            let mut pb2 = Vec::new();
            from_log_record(&log, &mut pb2).unwrap();
            assert_eq!(pb2, pb);
        }
    }

    #[test]
    fn known_bytes_and_unknown_fields() {
        // Field 1 first (tag 0x0a): never the log layout's version byte.
        let mut pb = Vec::new();
        encode(&sample("1.2.3.4", vec![], Flags::default()), &mut pb);
        assert_eq!(&pb[..2], &[0x0a, 16]);
        // A field from a later version (99, varint and bytes) is skipped.
        let mut more = pb.clone();
        more.extend_from_slice(&[0x98, 0x06, 0x05, 0x9a, 0x06, 0x02, b'h', b'i']);
        assert_eq!(decode(&more).unwrap(), decode(&pb).unwrap());
    }

    #[test]
    fn bad_values_are_errors_naming_the_field() {
        let r = sample("1.2.3.4", vec![], Flags::default());
        let mut pb = Vec::new();
        encode(&r, &mut pb);
        // Without its event id (the first 18 bytes).
        assert_eq!(
            decode(&pb[18..]),
            Err(RecordError::Protobuf("event_id is missing"))
        );
        // device 9
        let mut d = pb.clone();
        d.extend_from_slice(&[F_DEVICE as u8 * 8, 9]);
        assert!(matches!(decode(&d), Err(RecordError::Protobuf(m)) if m.contains("device")));
        // 17 rules
        let mut many = pb.clone();
        for _ in 0..17 {
            many.extend_from_slice(&[0x82, 0x01, 1, b'r']);
        }
        assert_eq!(decode(&many), Err(RecordError::Rules));
        // wrong wire type for ts_ms
        let mut w = pb.clone();
        w.extend_from_slice(&[(F_TS_MS << 3 | LEN) as u8, 0]);
        assert!(decode(&w).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
            let _ = decode_value(&bytes);
        }

        #[test]
        fn truncation_is_an_error(cut in 1usize..60) {
            let mut pb = Vec::new();
            encode(&sample("1.2.3.4", vec!["x"], Flags::default()), &mut pb);
            let cut = cut.min(pb.len() - 1);
            // A cut inside a field is an error; a cut between fields may still parse,
            // but never panics and never reads past the end.
            let _ = decode(&pb[..cut]);
            prop_assert!(decode(&pb[..pb.len() - 1]).is_err());
        }
    }
}
