//! The click event of docs/schema.md, validated.
//!
//! `Click<'a>` borrows its strings from the request buffer: parsing and validating an
//! event allocates nothing unless a string carries JSON escapes.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

/// Largest `user_id`, in bytes (docs/schema.md).
pub const USER_ID_BYTES_MAX: usize = 64;
/// Largest `user_agent`, in bytes (docs/schema.md).
pub const USER_AGENT_BYTES_MAX: usize = 512;
/// Largest `cost_micros` (docs/schema.md).
pub const COST_MICROS_MAX: u64 = 1_000_000_000_000;

/// The raw event's fields (docs/schema.md), in schema order: the one list the rejection
/// counters, the archive's columns and the tests take them from.
pub const FIELDS: [&str; 12] = [
    "event_id",
    "ts",
    "campaign_id",
    "ad_id",
    "publisher_id",
    "advertiser_id",
    "user_id",
    "ip",
    "user_agent",
    "country",
    "device",
    "cost_micros",
];

/// Each byte's value as a hex digit (either case), 0xff for any other byte.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// An RFC 4122 UUID in binary form; the dedup key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EventId(pub [u8; 16]);

impl EventId {
    /// Parses the 36-character textual form (8-4-4-4-12 hex digits, either case).
    /// Branch-free over the digits: a table maps every byte to its value or to 0xff,
    /// and one test of the or-ed values rejects any non-digit (billing parses every
    /// archived row's id, the dataplane every click's).
    #[inline]
    pub fn parse(s: &str) -> Option<EventId> {
        let b: &[u8; 36] = s.as_bytes().try_into().ok()?;
        if b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
            return None;
        }
        const POS: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
        let mut out = [0u8; 16];
        let mut seen = 0u8;
        for (o, &p) in out.iter_mut().zip(POS.iter()) {
            let (hi, lo) = (HEX_VALUE[b[p] as usize], HEX_VALUE[b[p + 1] as usize]);
            seen |= hi | lo;
            *o = (hi << 4) | (lo & 0x0f);
        }
        (seen & 0xf0 == 0).then_some(EventId(out))
    }

    /// Writes the canonical lowercase 36-character form into `out`.
    pub fn write_text(&self, out: &mut [u8; 36]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut j = 0;
        for (i, byte) in self.0.iter().enumerate() {
            if i == 4 || i == 6 || i == 8 || i == 10 {
                out[j] = b'-';
                j += 1;
            }
            out[j] = HEX[(byte >> 4) as usize];
            out[j + 1] = HEX[(byte & 0xf) as usize];
            j += 2;
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 36];
        self.write_text(&mut buf);
        // write_text only emits ASCII.
        f.write_str(std::str::from_utf8(&buf).expect("ascii"))
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The `device` field (docs/schema.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Device {
    Mobile = 0,
    Desktop = 1,
    Tablet = 2,
    Ctv = 3,
    Other = 4,
}

impl Device {
    pub const ALL: [Device; 5] = [
        Device::Mobile,
        Device::Desktop,
        Device::Tablet,
        Device::Ctv,
        Device::Other,
    ];

    pub fn parse(s: &str) -> Option<Device> {
        Some(match s {
            "mobile" => Device::Mobile,
            "desktop" => Device::Desktop,
            "tablet" => Device::Tablet,
            "ctv" => Device::Ctv,
            "other" => Device::Other,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Device::Mobile => "mobile",
            Device::Desktop => "desktop",
            Device::Tablet => "tablet",
            Device::Ctv => "ctv",
            Device::Other => "other",
        }
    }

    pub fn from_u8(v: u8) -> Option<Device> {
        Device::ALL.get(v as usize).copied()
    }
}

/// A validated click (docs/schema.md). Strings borrow from the input unless they were
/// escaped in the JSON text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Click<'a> {
    pub event_id: EventId,
    /// Event time, ms since the Unix epoch (UTC).
    pub ts_ms: u64,
    pub campaign_id: u64,
    pub ad_id: u64,
    pub publisher_id: u64,
    pub advertiser_id: u64,
    /// 1..=64 bytes.
    pub user_id: Cow<'a, str>,
    pub ip: IpAddr,
    /// 0..=512 bytes.
    pub user_agent: Cow<'a, str>,
    /// ISO 3166-1 alpha-2, two uppercase ASCII letters.
    pub country: [u8; 2],
    pub device: Device,
    /// 0..=10^12.
    pub cost_micros: u64,
}

impl Click<'_> {
    pub fn country_str(&self) -> &str {
        // Validation admits only ASCII uppercase letters.
        std::str::from_utf8(&self.country).unwrap_or("??")
    }

    pub fn into_owned(self) -> Click<'static> {
        Click {
            user_id: Cow::Owned(self.user_id.into_owned()),
            user_agent: Cow::Owned(self.user_agent.into_owned()),
            ..self
        }
    }
}

/// Why an event was rejected: the field at fault (None when the JSON itself is bad) and
/// a reason a publisher can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.display())]
pub struct EventError {
    pub field: Option<&'static str>,
    pub reason: Cow<'static, str>,
}

impl EventError {
    pub fn field(field: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        EventError {
            field: Some(field),
            reason: reason.into(),
        }
    }

    pub fn syntax(reason: impl Into<Cow<'static, str>>) -> Self {
        EventError {
            field: None,
            reason: reason.into(),
        }
    }

    fn display(&self) -> String {
        match self.field {
            Some(f) => format!("{f}: {}", self.reason),
            None => self.reason.to_string(),
        }
    }
}
