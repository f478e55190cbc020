//! The per-click feature vector of the gradient-boosted model billing applies
//! (`clickgate billing --model`, docs/model.md), and the feature definitions it shares
//! with the stream's `risk_model` rule ([`super::risk`]).
//!
//! One function, [`vector`], computes the vector; the definitions the stream's risk
//! model also reads ([`hour_of_day`], [`ua_device_mismatch`], [`ip_v6`],
//! [`cost_units`], the user agent's [`UaTraits`]) are the functions below, called by
//! both. Every input is in the archive, so billing computes the vector from archived
//! columns and the day's per-IP counts.
//!
//! | index | name | value (as `f32`) |
//! |---|---|---|
//! | 0 | `hour` | UTC hour of `ts`, 0..=23 |
//! | 1 | `ua_bot` | 1 if the user agent contains a [`BOT_UA_TOKENS`] token (ASCII case-insensitive), else 0 |
//! | 2 | `ua_empty` | 1 if the user agent is empty, else 0 |
//! | 3 | `ua_len` | the user agent's length in bytes |
//! | 4 | `ua_device_mismatch` | 1 if `device` is mobile/tablet and the user agent has no mobile token, or desktop and it has one |
//! | 5 | `ip_v6` | 1 for an IPv6 address that is not IPv4-mapped |
//! | 6 | `ip_minute_clicks` | deduplicated clicks of the IP in the click's UTC minute of the day (the click included) |
//! | 7 | `ip_day_clicks` | deduplicated clicks of the IP in the day |
//! | 8 | `ip_day_campaigns` | distinct campaigns among the IP's deduplicated clicks of the day |
//! | 9 | `cost_units` | `cost_micros / 10^6` in `f64`, rounded to `f32` |
//! | 10 | `device` | 0 mobile, 1 desktop, 2 tablet, 3 ctv, 4 other |
//! | 11 | `country` | `256 × byte 0 + byte 1` of the two-letter code (`US` = 21843) |
//! | 12 | `ip_hist_days` | days with a click of the IP among the history's days before this one |
//! | 13 | `ip_hist_clicks` | the IP's deduplicated clicks over those days |
//! | 14 | `ip_hist_fraud_share` | its clicks billing removed over those days / `ip_hist_clicks` (`f64`, then `f32`); missing (NaN) without clicks |
//! | 15 | `ip_age_days` | days since the IP was first seen (0: first seen this day) |
//!
//! The first [`FEATURES_DAY`] need only the day; the last four, the IP's history kept
//! across days ([`IpPast`]). Counts are converted with `as f32` (round to nearest;
//! exact below 2^24).

use std::net::IpAddr;
use std::sync::OnceLock;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind};

use super::{BOT_UA_TOKENS, MOBILE_UA_TOKENS};
use crate::{Click, Device};

/// Length of the feature vector: a model has this `num_feature`, or [`FEATURES_DAY`].
pub const FEATURES: usize = 16;

/// The features computed from the day alone (indices below this one).
pub const FEATURES_DAY: usize = 12;

/// The features' names, by index (docs/model.md).
pub const FEATURE_NAMES: [&str; FEATURES] = [
    "hour",
    "ua_bot",
    "ua_empty",
    "ua_len",
    "ua_device_mismatch",
    "ip_v6",
    "ip_minute_clicks",
    "ip_day_clicks",
    "ip_day_campaigns",
    "cost_units",
    "device",
    "country",
    "ip_hist_days",
    "ip_hist_clicks",
    "ip_hist_fraud_share",
    "ip_age_days",
];

/// What the features read from a user agent: computed once per distinct user agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UaTraits {
    /// Contains a [`BOT_UA_TOKENS`] token.
    pub bot: bool,
    /// Contains a mobile-platform token (`mobile`, `android`, `iphone`, `ipad`, `ipod`).
    pub mobile: bool,
    /// Length in bytes.
    pub len: u32,
}

/// The click's IP in its day (billing's exact counts; see the table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpDay {
    pub minute_clicks: u32,
    pub day_clicks: u32,
    pub day_campaigns: u32,
}

/// The click's IP in the history kept across days, before the click's day.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpPast {
    /// Days with a click of the IP.
    pub days: u32,
    pub clicks: u64,
    /// Of those clicks, the ones billing removed.
    pub fraud: u64,
    /// Days since the IP was first seen (0: first seen on the click's day).
    pub age_days: u32,
}

impl IpPast {
    /// `fraud / clicks`, missing (NaN) without clicks.
    #[inline]
    pub fn fraud_share(&self) -> f32 {
        if self.clicks == 0 {
            f32::NAN
        } else {
            (self.fraud as f64 / self.clicks as f64) as f32
        }
    }
}

/// One automaton over the bot tokens then the mobile tokens (pattern index below
/// `BOT_UA_TOKENS.len()`: a bot token), ASCII case-insensitive: one scan of a user
/// agent gives both facts. The stream's risk model and [`ua_traits`] use it.
pub fn ua_token_automaton() -> Result<AhoCorasick, aho_corasick::BuildError> {
    let tokens: Vec<&str> = BOT_UA_TOKENS
        .iter()
        .chain(MOBILE_UA_TOKENS)
        .copied()
        .collect();
    // Short common-letter tokens: a prefilter would fire every few bytes; the plain
    // DFA scan is faster.
    AhoCorasickBuilder::new()
        .ascii_case_insensitive(true)
        .kind(Some(AhoCorasickKind::DFA))
        .prefilter(false)
        .build(&tokens)
}

/// (bot, mobile) of a user agent with an automaton from [`ua_token_automaton`].
pub fn ua_tokens(ac: &AhoCorasick, user_agent: &str) -> (bool, bool) {
    let (mut bot, mut mobile) = (false, false);
    for m in ac.find_overlapping_iter(user_agent.as_bytes()) {
        if m.pattern().as_usize() < BOT_UA_TOKENS.len() {
            bot = true;
        } else {
            mobile = true;
        }
    }
    (bot, mobile)
}

/// The user agent's traits.
pub fn ua_traits(user_agent: &str) -> UaTraits {
    static AC: OnceLock<AhoCorasick> = OnceLock::new();
    let ac = AC.get_or_init(|| ua_token_automaton().expect("fixed tokens build"));
    let (bot, mobile) = ua_tokens(ac, user_agent);
    UaTraits {
        bot,
        mobile,
        len: user_agent.len() as u32,
    }
}

/// UTC hour of an event time (ms since the epoch), 0..=23.
#[inline]
pub fn hour_of_day(ts_ms: u64) -> u32 {
    ((ts_ms / 3_600_000) % 24) as u32
}

/// `device` is mobile/tablet but the user agent names no mobile platform, or desktop
/// but it does.
#[inline]
pub fn ua_device_mismatch(device: Device, ua_mobile: bool) -> bool {
    match device {
        Device::Mobile | Device::Tablet => !ua_mobile,
        Device::Desktop => ua_mobile,
        Device::Ctv | Device::Other => false,
    }
}

/// An IPv6 address that is not IPv4-mapped.
#[inline]
pub fn ip_v6(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(a) if a.to_ipv4_mapped().is_none())
}

/// `cost_micros / 10^6`.
#[inline]
pub fn cost_units(cost_micros: u64) -> f64 {
    cost_micros as f64 / 1e6
}

/// The feature vector of one click (the table in the module docs).
#[inline]
pub fn vector(click: &Click<'_>, ua: &UaTraits, ip: &IpDay, past: &IpPast) -> [f32; FEATURES] {
    let b = |v: bool| if v { 1.0 } else { 0.0 };
    [
        hour_of_day(click.ts_ms) as f32,
        b(ua.bot),
        b(ua.len == 0),
        ua.len as f32,
        b(ua_device_mismatch(click.device, ua.mobile)),
        b(ip_v6(click.ip)),
        ip.minute_clicks as f32,
        ip.day_clicks as f32,
        ip.day_campaigns as f32,
        cost_units(click.cost_micros) as f32,
        click.device as u8 as f32,
        (u32::from(click.country[0]) * 256 + u32::from(click.country[1])) as f32,
        past.days as f32,
        past.clicks as f32,
        past.fraud_share(),
        past.age_days as f32,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn the_vector_follows_the_documented_table() {
        let c = Click {
            event_id: crate::EventId([0; 16]),
            ts_ms: 3 * 86_400_000 + 5 * 3_600_000 + 17,
            campaign_id: 1,
            ad_id: 2,
            publisher_id: 3,
            advertiser_id: 4,
            user_id: Cow::Borrowed("u"),
            ip: "2001:db8::1".parse().unwrap(),
            user_agent: Cow::Borrowed("Googlebot/2.1"),
            country: *b"US",
            device: Device::Tablet,
            cost_micros: 1_500_000,
        };
        let ua = ua_traits(&c.user_agent);
        assert_eq!(
            ua,
            UaTraits {
                bot: true,
                mobile: false,
                len: 13
            }
        );
        let ip = IpDay {
            minute_clicks: 3,
            day_clicks: 40,
            day_campaigns: 7,
        };
        let past = IpPast {
            days: 2,
            clicks: 30,
            fraud: 10,
            age_days: 9,
        };
        let v = vector(&c, &ua, &ip, &past);
        assert_eq!(
            v,
            [
                5.0,
                1.0,
                0.0,
                13.0,
                1.0,
                1.0,
                3.0,
                40.0,
                7.0,
                1.5,
                2.0,
                21843.0,
                2.0,
                30.0,
                (1.0f64 / 3.0) as f32,
                9.0
            ]
        );
        let new = vector(&c, &ua, &ip, &IpPast::default());
        assert!(new[14].is_nan() && new[12] == 0.0 && new[15] == 0.0);
        assert_eq!(FEATURE_NAMES.len(), v.len());
        assert!(!ip_v6("::ffff:1.2.3.4".parse().unwrap()));
        let m = ua_traits("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)");
        assert!(m.mobile && !m.bot);
        assert!(ua_traits("").len == 0);
    }
}
