//! Parsing and validating one click event (docs/schema.md) with sonic-rs.
//!
//! Cost per event on a 100-line compact NDJSON body (bench/PARSE.md has the machine, the
//! method and the caveats; the box is shared, so figures are the minimum over 3000
//! batches, side by side in one process): sonic-rs into a derived serde struct 685 ns,
//! `parse_click` (sonic-rs + visitor + every rule of docs/schema.md) 797 ns. Most of the
//! difference is validation the serde struct does not do. The UUID and IPv4 checks have
//! branch-free / hand-rolled fast paths (std's `IpAddr` parser stays as the IPv6 path).
//!
//! The parse is a hand-written serde map visitor rather than a derived struct so that an
//! error names the field at fault, strings borrow from the request buffer (nothing is
//! allocated unless a string carries escapes), and validation runs once per field.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::event::{COST_MICROS_MAX, USER_AGENT_BYTES_MAX, USER_ID_BYTES_MAX};
use crate::{Click, Device, EventError, EventId};

/// Longest syntax-error reason we hand back; the publisher needs the gist and the offset,
/// not an echo of its input.
const SYNTAX_REASON_BYTES_MAX: usize = 96;

const EXPECTED_STRING: &str = "expected a string";
const EXPECTED_U64: &str = "expected an unsigned 64-bit integer";
const EXPECTED_TS: &str = "expected an unsigned integer (ms since the Unix epoch)";
const EXPECTED_COST: &str = "expected an unsigned integer (millionths of the currency unit)";

/// Parses and validates one JSON event (docs/schema.md) with SIMD JSON.
/// `now_ms`: wall clock; events with ts > now_ms + skew_ms are rejected.
pub fn parse_click(json: &[u8], now_ms: u64, skew_ms: u64) -> Result<Click<'_>, EventError> {
    // Validating UTF-8 up front lets sonic-rs skip its own check and guarantees that
    // ignored (unknown) fields are valid text too.
    let text = std::str::from_utf8(json)
        .map_err(|_| EventError::syntax("malformed JSON: invalid UTF-8"))?;
    if text.trim_ascii().is_empty() {
        return Err(EventError::syntax("malformed JSON: empty input"));
    }
    let mut fault = None;
    let mut de = sonic_rs::Deserializer::from_str(text);
    // Filled in place: returning it through serde's `Result` would copy ~240 bytes twice.
    let mut raw = Raw::default();
    let seed = RawSeed {
        fault: &mut fault,
        raw: &mut raw,
    };
    if let Err(e) = seed.deserialize(&mut de) {
        return Err(classify(&e, fault));
    }
    de.end().map_err(|e| syntax_error(&e))?;
    raw.validate(now_ms, skew_ms)
}

/// A field-level fault recorded by the visitor stands only when sonic-rs reports a type
/// mismatch: a syntax error inside a value (say, a truncated number) is bad JSON, not a
/// bad field.
#[cold]
fn classify(e: &sonic_rs::Error, fault: Option<EventError>) -> EventError {
    match (e.classify(), fault) {
        (sonic_rs::error::Category::TypeUnmatched, Some(fault)) => fault,
        _ => syntax_error(e),
    }
}

#[cold]
fn syntax_error(e: &sonic_rs::Error) -> EventError {
    let reason = match e.classify() {
        sonic_rs::error::Category::Eof => "malformed JSON: unexpected end of input".to_owned(),
        sonic_rs::error::Category::TypeUnmatched => {
            "malformed JSON: the event must be a JSON object".to_owned()
        }
        _ => {
            let text = e.to_string();
            let what = text.split(" at line").next().unwrap_or("invalid JSON");
            let mut reason = format!("malformed JSON: {what} at byte {}", e.offset());
            if reason.len() > SYNTAX_REASON_BYTES_MAX {
                let mut cut = SYNTAX_REASON_BYTES_MAX;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
            }
            reason
        }
    };
    EventError::syntax(reason)
}

/// The fields as they appear in the JSON, before validation.
#[derive(Default)]
struct Raw<'a> {
    event_id: Option<Str<'a>>,
    ts: Option<u64>,
    campaign_id: Option<u64>,
    ad_id: Option<u64>,
    publisher_id: Option<u64>,
    advertiser_id: Option<u64>,
    user_id: Option<Str<'a>>,
    ip: Option<Str<'a>>,
    user_agent: Option<Str<'a>>,
    country: Option<Str<'a>>,
    device: Option<Str<'a>>,
    cost_micros: Option<u64>,
}

#[inline]
fn required<T>(v: Option<T>, field: &'static str) -> Result<T, EventError> {
    match v {
        Some(v) => Ok(v),
        None => Err(missing(field)),
    }
}

#[cold]
fn missing(field: &'static str) -> EventError {
    EventError::field(field, "missing")
}

/// `s.parse::<IpAddr>()` with a fast path for dotted-quad IPv4 (std's parser is generic
/// over both families and several times slower). The fast path accepts a subset of what
/// std accepts, with the same value; everything else, IPv6 included, goes to std.
#[inline]
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    match parse_ipv4(s.as_bytes()) {
        Some(v4) => Some(IpAddr::V4(v4)),
        None => s.parse().ok(),
    }
}

/// Four decimal octets of 1-3 digits, each <= 255 and without a leading zero, separated
/// by dots: exactly std's IPv4 grammar.
#[inline]
fn parse_ipv4(b: &[u8]) -> Option<Ipv4Addr> {
    if !(7..=15).contains(&b.len()) {
        return None;
    }
    let mut octets = [0u8; 4];
    let mut i = 0;
    for (n, octet) in octets.iter_mut().enumerate() {
        if n > 0 {
            if b.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
        let start = i;
        let mut v = 0u32;
        while i < b.len() && i - start < 3 && b[i].is_ascii_digit() {
            v = v * 10 + (b[i] - b'0') as u32;
            i += 1;
        }
        if i == start || v > 255 || (i - start > 1 && b[start] == b'0') {
            return None;
        }
        *octet = v as u8;
    }
    (i == b.len()).then_some(Ipv4Addr::from(octets))
}

impl<'a> Raw<'a> {
    /// Checks the rules of docs/schema.md in the contract's field order, so the reported
    /// field does not depend on the order of keys in the input.
    fn validate(self, now_ms: u64, skew_ms: u64) -> Result<Click<'a>, EventError> {
        let event_id = required(self.event_id, "event_id")?;
        let event_id = EventId::parse(&event_id.0).ok_or_else(|| {
            EventError::field(
                "event_id",
                "must be a 36-character UUID (8-4-4-4-12 hex digits)",
            )
        })?;
        let ts_ms = required(self.ts, "ts")?;
        if ts_ms > now_ms.saturating_add(skew_ms) {
            return Err(EventError::field(
                "ts",
                "is in the future by more than the allowed clock skew (ts is ms since the Unix epoch)",
            ));
        }
        let campaign_id = required(self.campaign_id, "campaign_id")?;
        let ad_id = required(self.ad_id, "ad_id")?;
        let publisher_id = required(self.publisher_id, "publisher_id")?;
        let advertiser_id = required(self.advertiser_id, "advertiser_id")?;
        let user_id = required(self.user_id, "user_id")?.0;
        if user_id.is_empty() || user_id.len() > USER_ID_BYTES_MAX {
            return Err(EventError::field("user_id", "must be 1 to 64 bytes long"));
        }
        let ip = required(self.ip, "ip")?;
        let ip = parse_ip(&ip.0)
            .ok_or_else(|| EventError::field("ip", "must be an IPv4 or IPv6 address"))?;
        let user_agent = required(self.user_agent, "user_agent")?.0;
        if user_agent.len() > USER_AGENT_BYTES_MAX {
            return Err(EventError::field(
                "user_agent",
                "must be at most 512 bytes long",
            ));
        }
        let country = required(self.country, "country")?;
        let country = match country.0.as_bytes() {
            &[a, b] if a.is_ascii_uppercase() && b.is_ascii_uppercase() => [a, b],
            _ => {
                return Err(EventError::field(
                    "country",
                    "must be two uppercase letters (ISO 3166-1 alpha-2)",
                ))
            }
        };
        let device = required(self.device, "device")?;
        let device = Device::parse(&device.0).ok_or_else(|| {
            EventError::field(
                "device",
                "must be one of mobile, desktop, tablet, ctv, other",
            )
        })?;
        let cost_micros = required(self.cost_micros, "cost_micros")?;
        if cost_micros > COST_MICROS_MAX {
            return Err(EventError::field(
                "cost_micros",
                "must be between 0 and 1000000000000 (10^12)",
            ));
        }
        Ok(Click {
            event_id,
            ts_ms,
            campaign_id,
            ad_id,
            publisher_id,
            advertiser_id,
            user_id,
            ip,
            user_agent,
            country,
            device,
            cost_micros,
        })
    }
}

/// A JSON string that borrows from the input unless it had escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(StrVisitor)
    }
}

struct StrVisitor;

impl<'de> Visitor<'de> for StrVisitor {
    type Value = Str<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
        Ok(Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'de>, E> {
        Ok(Str(Cow::Owned(v.to_owned())))
    }
}

enum Key {
    EventId,
    Ts,
    CampaignId,
    AdId,
    PublisherId,
    AdvertiserId,
    UserId,
    Ip,
    UserAgent,
    Country,
    Device,
    CostMicros,
    Unknown,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_identifier(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(match v {
            "event_id" => Key::EventId,
            "ts" => Key::Ts,
            "campaign_id" => Key::CampaignId,
            "ad_id" => Key::AdId,
            "publisher_id" => Key::PublisherId,
            "advertiser_id" => Key::AdvertiserId,
            "user_id" => Key::UserId,
            "ip" => Key::Ip,
            "user_agent" => Key::UserAgent,
            "country" => Key::Country,
            "device" => Key::Device,
            "cost_micros" => Key::CostMicros,
            _ => Key::Unknown,
        })
    }
}

/// A seed rather than a plain `Deserialize` impl: serde errors are opaque strings, so the
/// visitor records the field at fault here and `parse_click` picks it up, without
/// formatting or re-parsing error messages on the reject path.
struct RawSeed<'f, 'de> {
    fault: &'f mut Option<EventError>,
    raw: &'f mut Raw<'de>,
}

impl<'de> DeserializeSeed<'de> for RawSeed<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

/// Reads one value into `slot`, recording which field failed and what it should be.
#[inline(always)]
fn take<'de, A, T>(
    map: &mut A,
    slot: &mut Option<T>,
    fault: &mut Option<EventError>,
    field: &'static str,
    expected: &'static str,
) -> Result<(), A::Error>
where
    A: MapAccess<'de>,
    T: Deserialize<'de>,
{
    if slot.is_some() {
        // Two parsers reading "last wins" and "first wins" would see different events;
        // refuse the ambiguity.
        return Err(duplicate(fault, field));
    }
    match map.next_value::<T>() {
        Ok(v) => {
            *slot = Some(v);
            Ok(())
        }
        Err(e) => Err(ill_typed(fault, field, expected, e)),
    }
}

#[cold]
fn duplicate<E: de::Error>(fault: &mut Option<EventError>, field: &'static str) -> E {
    *fault = Some(EventError::field(field, "appears more than once"));
    E::custom("duplicate field")
}

#[cold]
fn ill_typed<E>(
    fault: &mut Option<EventError>,
    field: &'static str,
    expected: &'static str,
    e: E,
) -> E {
    *fault = Some(EventError::field(field, expected));
    e
}

impl<'de> Visitor<'de> for RawSeed<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a click event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let raw = self.raw;
        let f = self.fault;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::EventId => take(&mut map, &mut raw.event_id, f, "event_id", EXPECTED_STRING)?,
                Key::Ts => take(&mut map, &mut raw.ts, f, "ts", EXPECTED_TS)?,
                Key::CampaignId => take(
                    &mut map,
                    &mut raw.campaign_id,
                    f,
                    "campaign_id",
                    EXPECTED_U64,
                )?,
                Key::AdId => take(&mut map, &mut raw.ad_id, f, "ad_id", EXPECTED_U64)?,
                Key::PublisherId => take(
                    &mut map,
                    &mut raw.publisher_id,
                    f,
                    "publisher_id",
                    EXPECTED_U64,
                )?,
                Key::AdvertiserId => take(
                    &mut map,
                    &mut raw.advertiser_id,
                    f,
                    "advertiser_id",
                    EXPECTED_U64,
                )?,
                Key::UserId => take(&mut map, &mut raw.user_id, f, "user_id", EXPECTED_STRING)?,
                Key::Ip => take(&mut map, &mut raw.ip, f, "ip", EXPECTED_STRING)?,
                Key::UserAgent => take(
                    &mut map,
                    &mut raw.user_agent,
                    f,
                    "user_agent",
                    EXPECTED_STRING,
                )?,
                Key::Country => take(&mut map, &mut raw.country, f, "country", EXPECTED_STRING)?,
                Key::Device => take(&mut map, &mut raw.device, f, "device", EXPECTED_STRING)?,
                Key::CostMicros => take(
                    &mut map,
                    &mut raw.cost_micros,
                    f,
                    "cost_micros",
                    EXPECTED_COST,
                )?,
                Key::Unknown => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// The UUID grammar written plainly, one digit at a time: what `EventId::parse`
    /// must agree with.
    fn reference_event_id(s: &str) -> Option<EventId> {
        let b = s.as_bytes();
        if b.len() != 36 {
            return None;
        }
        let mut out = [0u8; 16];
        let mut nibble = 0usize;
        for (i, &c) in b.iter().enumerate() {
            if [8, 13, 18, 23].contains(&i) {
                if c != b'-' {
                    return None;
                }
                continue;
            }
            let v = (c as char).to_digit(16)? as u8;
            out[nibble / 2] |= if nibble.is_multiple_of(2) { v << 4 } else { v };
            nibble += 1;
        }
        Some(EventId(out))
    }

    const NOW: u64 = 1_764_201_600_123;
    const SKEW: u64 = 300_000;

    const SAMPLE: &str = r#"{
  "event_id": "6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f",
  "ts": 1764201600123,
  "campaign_id": 12345,
  "ad_id": 678,
  "publisher_id": 42,
  "advertiser_id": 7,
  "user_id": "u-88121",
  "ip": "203.0.113.7",
  "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
  "country": "US",
  "device": "mobile",
  "cost_micros": 500000
}"#;

    fn sample() -> Value {
        serde_json::from_str(SAMPLE).expect("sample is JSON")
    }

    fn parse(text: &str) -> Result<Click<'_>, EventError> {
        parse_click(text.as_bytes(), NOW, SKEW)
    }

    #[test]
    fn parses_the_contract_sample_without_allocating_strings() {
        let c = parse(SAMPLE).expect("valid");
        assert_eq!(
            c.event_id.to_string(),
            "6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f"
        );
        assert_eq!(c.ts_ms, 1_764_201_600_123);
        assert_eq!(
            (c.campaign_id, c.ad_id, c.publisher_id, c.advertiser_id),
            (12345, 678, 42, 7)
        );
        assert!(matches!(c.user_id, Cow::Borrowed("u-88121")));
        assert!(matches!(c.user_agent, Cow::Borrowed(_)));
        assert_eq!(c.ip, "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(c.country_str(), "US");
        assert_eq!(c.device, Device::Mobile);
        assert_eq!(c.cost_micros, 500_000);
    }

    #[test]
    fn escaped_strings_are_unescaped_and_owned() {
        let mut v = sample();
        v["user_id"] = json!("a\"b\\c\u{e9}");
        let text = v.to_string().replace('\u{e9}', "\\u00e9");
        let c = parse(&text).expect("valid");
        assert_eq!(c.user_id, "a\"b\\c\u{e9}");
        assert!(matches!(c.user_id, Cow::Owned(_)));
    }

    #[test]
    fn unknown_fields_of_any_shape_are_ignored() {
        let mut v = sample();
        v["extra"] = json!({"nested": [1, 2.5, null, "x", {"y": true}]});
        v["zzz"] = json!(null);
        assert!(parse(&v.to_string()).is_ok());
    }

    /// `expected` is the field the error must name; None for malformed JSON.
    fn check(input: &str, expected: Option<&str>) {
        match parse(input) {
            Ok(c) => panic!("accepted {input}: {c:?}"),
            Err(e) => {
                assert_eq!(e.field, expected, "input {input}: {e}");
                assert!(e.reason.len() <= 120, "reason too long: {}", e.reason);
                if expected.is_none() {
                    assert!(e.reason.starts_with("malformed JSON"), "{e}");
                }
            }
        }
    }

    fn with(field: &str, value: Value) -> String {
        let mut v = sample();
        v[field] = value;
        v.to_string()
    }

    fn without(field: &str) -> String {
        let mut v = sample();
        v.as_object_mut().expect("object").remove(field);
        v.to_string()
    }

    #[test]
    fn each_invalid_field_is_named() {
        let table: Vec<(&str, Value)> = vec![
            ("event_id", json!("6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5")),
            ("event_id", json!("6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5g")),
            ("event_id", json!(12)),
            ("event_id", json!(null)),
            ("ts", json!(NOW + SKEW + 1)),
            ("ts", json!(-1)),
            ("ts", json!(1.5)),
            ("ts", json!("1764201600123")),
            ("campaign_id", json!(-5)),
            ("campaign_id", json!(1.0)),
            ("campaign_id", json!("12")),
            ("campaign_id", json!(1e3)),
            ("ad_id", json!(null)),
            ("ad_id", json!([1])),
            ("publisher_id", json!({"a": 1})),
            ("advertiser_id", json!(true)),
            ("user_id", json!("")),
            ("user_id", json!("x".repeat(65))),
            ("user_id", json!(5)),
            ("ip", json!("203.0.113")),
            ("ip", json!("203.0.113.7:80")),
            ("ip", json!("fe80::1%eth0")),
            ("ip", json!("")),
            ("user_agent", json!("x".repeat(513))),
            ("user_agent", json!(null)),
            ("country", json!("us")),
            ("country", json!("USA")),
            ("country", json!("U")),
            ("country", json!("\u{c9}S")),
            ("device", json!("phone")),
            ("device", json!("Mobile")),
            ("cost_micros", json!(1_000_000_000_001u64)),
            ("cost_micros", json!(-1)),
        ];
        for (field, value) in table {
            check(&with(field, value), Some(field));
        }
        for field in crate::event::FIELDS {
            check(&without(field), Some(field));
        }
        // u64 overflow is an ill-typed id, not bad JSON.
        check(
            &SAMPLE.replace("12345", "18446744073709551616"),
            Some("campaign_id"),
        );
        // Duplicate keys are ambiguous between parsers.
        check(
            &SAMPLE.replace("\"ad_id\": 678", "\"ad_id\": 678, \"ad_id\": 679"),
            Some("ad_id"),
        );
    }

    #[test]
    fn limits_are_inclusive() {
        assert!(parse(&with("user_id", json!("x".repeat(64)))).is_ok());
        assert!(parse(&with("user_agent", json!("x".repeat(512)))).is_ok());
        assert!(parse(&with("user_agent", json!(""))).is_ok());
        assert!(parse(&with("cost_micros", json!(1_000_000_000_000u64))).is_ok());
        assert!(parse(&with("cost_micros", json!(0))).is_ok());
        assert!(parse(&with("ts", json!(NOW + SKEW))).is_ok());
        assert!(parse(&with("ts", json!(0))).is_ok());
        assert!(parse(&with("ip", json!("2001:db8::1"))).is_ok());
        assert!(parse(&with("campaign_id", json!(u64::MAX))).is_ok());
        // Lengths are bytes, not characters.
        assert!(parse(&with("user_id", json!("\u{e9}".repeat(33)))).is_err());
        assert!(parse(&with("user_id", json!("\u{e9}".repeat(32)))).is_ok());
    }

    #[test]
    fn malformed_json_names_no_field() {
        for input in [
            "",
            "   \n",
            "[]",
            "[1,2]",
            "\"x\"",
            "null",
            "42",
            "{",
            "{\"event_id\"",
            "{\"event_id\":",
            "{\"ts\": 12x}",
            "{\"ts\": 1,}",
            "{'ts': 1}",
            "{\"ts\": 01}",
        ] {
            check(input, None);
        }
        check(&format!("{SAMPLE} {{}}"), None);
        check(&format!("{SAMPLE}x"), None);
        check(&SAMPLE[..SAMPLE.len() - 1], None);
        let mut bad_utf8 = SAMPLE.as_bytes().to_vec();
        let at = bad_utf8.len() - 3;
        bad_utf8.splice(at..at, [b',', b'"', b'x', b'"', b':', b'"', 0xff, b'"']);
        let e = parse_click(&bad_utf8, NOW, SKEW).expect_err("invalid UTF-8");
        assert_eq!(e.field, None);
        // Trailing whitespace is fine (NDJSON lines may keep their '\r').
        assert!(parse(&format!("{SAMPLE}\r\n ")).is_ok());
    }

    #[test]
    fn syntax_reasons_do_not_echo_the_input() {
        let junk = format!("{{\"a\": {}}}", "9".repeat(5000) + "x");
        let e = parse(&junk).expect_err("bad");
        assert!(e.reason.len() <= SYNTAX_REASON_BYTES_MAX, "{}", e.reason);
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u8; 16]>().prop_map(IpAddr::from),
        ]
    }

    prop_compose! {
        fn arb_click()(
            id in any::<[u8; 16]>(),
            ts in 0..=NOW + SKEW,
            ids in any::<[u64; 4]>(),
            user_id in "[a-zA-Z0-9_\\-\"\\\\/\u{e9}\u{1F600}\n]{1,16}",
            ip in arb_ip(),
            user_agent in "(?s).{0,128}",
            country in "[A-Z]{2}",
            device in 0u8..5,
            cost_micros in 0..=COST_MICROS_MAX,
        ) -> Click<'static> {
            Click {
                event_id: EventId(id),
                ts_ms: ts,
                campaign_id: ids[0],
                ad_id: ids[1],
                publisher_id: ids[2],
                advertiser_id: ids[3],
                user_id: Cow::Owned(user_id),
                ip,
                user_agent: Cow::Owned(user_agent),
                country: country.as_bytes().try_into().expect("two letters"),
                device: Device::from_u8(device).expect("in range"),
                cost_micros,
            }
        }
    }

    fn to_json(c: &Click<'_>, extra: Option<&str>) -> String {
        let mut v = json!({
            "event_id": c.event_id.to_string(),
            "ts": c.ts_ms,
            "campaign_id": c.campaign_id,
            "ad_id": c.ad_id,
            "publisher_id": c.publisher_id,
            "advertiser_id": c.advertiser_id,
            "user_id": c.user_id,
            "ip": c.ip.to_string(),
            "user_agent": c.user_agent,
            "country": c.country_str(),
            "device": c.device.as_str(),
            "cost_micros": c.cost_micros,
        });
        if let Some(extra) = extra {
            v["zz_extra"] = json!({ "s": extra, "a": [1, -2.5e10, null] });
        }
        v.to_string()
    }

    #[test]
    fn fast_paths_agree_with_std_and_event_id_parse() {
        for s in [
            "0.0.0.0",
            "255.255.255.255",
            "256.1.1.1",
            "1.2.3",
            "1.2.3.4.5",
            "01.2.3.4",
            "1.2.3.04",
            "1.2.3.4 ",
            "+1.2.3.4",
            "1..2.3",
            "1.2.3.4.",
            "1234.1.1.1",
            "::ffff:1.2.3.4",
            "2001:db8::1",
        ] {
            assert_eq!(parse_ip(s), s.parse().ok(), "{s}");
        }
        for s in [
            "6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f",
            "6F1C2F4E-8A3B-4C1D-9E2F-0A1B2C3D4E5F",
            "6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5g",
            "6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5",
            "6f1c2f4e08a3b-4c1d-9e2f-0a1b2c3d4e5f",
            "6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e\u{e9}",
            "------------------------------------",
        ] {
            assert_eq!(EventId::parse(s), reference_event_id(s), "{s}");
        }
    }

    proptest! {
        #[test]
        fn ipv4_fast_path_agrees_with_std(s in "[0-9.]{0,16}|[0-9]{1,3}(\\.[0-9]{1,4}){3}") {
            prop_assert_eq!(parse_ip(&s), s.parse().ok());
        }

        #[test]
        fn event_id_fast_path_agrees(s in "[0-9a-gA-G-]{36}|[0-9a-f]{8}-[0-9a-fA-F]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-fzZ\u{e9}]{12}") {
            prop_assert_eq!(EventId::parse(&s), reference_event_id(&s));
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_click(&bytes, NOW, SKEW);
        }

        #[test]
        fn jsonish_noise_never_panics(text in "[{}\\[\\]\":,0-9a-z\\-. \\\\eE]{0,256}") {
            let _ = parse(&text);
        }

        #[test]
        fn valid_events_round_trip(c in arb_click(), extra in proptest::option::of(".{0,32}")) {
            let text = to_json(&c, extra.as_deref());
            let parsed = parse(&text);
            prop_assert_eq!(parsed, Ok(c));
        }

        #[test]
        fn truncated_events_never_panic_and_never_pass(c in arb_click(), cut in any::<prop::sample::Index>()) {
            let text = to_json(&c, None);
            let cut = cut.index(text.len());
            let parsed = parse_click(&text.as_bytes()[..cut], NOW, SKEW);
            prop_assert!(parsed.is_err());
        }
    }
}
