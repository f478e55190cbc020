//! Fraud rules (docs/api.md, docs/fraud.md): the rule-set file format, its validation, the compiled
//! form every dataplane core and billing evaluate, and the per-IP minute counter.
//!
//! - [`RuleSet::parse`] reads the operator's JSON file (the contract's format, plus an
//!   optional `version`), validating every rule; one bad rule refuses the whole set with
//!   a [`RuleError`] that names the rule and the problem.
//! - [`CompiledRules::compile`] builds the immutable matcher: exact prefix sets
//!   ([`CidrSet`](crate::cidr::CidrSet); the bloom-fronted [`IpBlocklist`] measured
//!   slower, see its doc), one Aho-Corasick automaton over every user-agent pattern
//!   (ASCII case-insensitive, a DFA while small), honeypot ad-id sets, per-IP rate
//!   thresholds and logistic-regression risk models.
//! - [`CompiledRules::evaluate`] judges one click given the IP's click count in the
//!   click's minute and returns a [`Decision`]: fraud or not, and the rules that fired,
//!   in a fixed-size array (no allocation per click).
//! - [`IpRate`] is the stream's box-wide counter of clicks per (ip, UTC minute of `ts`):
//!   bounded, evicting the address seen least recently.
//!
//! Stream vs billing for `ip_rate` (docs/fraud.md): the stream flags the clicks past the
//! threshold in their minute as they come ([`CompiledRules::evaluate`] with the running
//! count from [`IpRate`]); billing, which sees the whole minute, flags every click of an
//! (ip, minute) whose deduplicated count exceeds the threshold: it calls
//! [`CompiledRules::evaluate_static`] and applies [`CompiledRules::ip_rate_rules`] itself.
//!
//! # Risk model features
//! A `risk_model` rule is `{"threshold": t, "model": {"bias": b, "weights": {...}}}`;
//! the score is `1 / (1 + e^-(b + Σ wᵢ·xᵢ))` and the click is fraud when score ≥ t.
//! Features (`xᵢ`), all computed from the click alone, except `ip_rate`:
//!
//! | name | value |
//! |---|---|
//! | `ua_bot` | 1 if the user agent contains a well-known automation token ([`BOT_UA_TOKENS`]) |
//! | `ua_empty` | 1 if the user agent is empty |
//! | `ua_short` | 1 if the user agent is shorter than 16 bytes |
//! | `ua_device_mismatch` | 1 if `device` is mobile/tablet but the UA names no mobile platform, or desktop but it does |
//! | `ip_rate` | clicks of this IP in this UTC minute so far (this one included) |
//! | `ip_v6` | 1 for a (non-mapped) IPv6 address |
//! | `hour_night` | 1 if the event's UTC hour is 0–5 |
//! | `country_mismatch` | 1 if the IP is in the model's `geo` table under another country than the click's |
//! | `device_ctv`, `device_other` | 1 for that device |
//! | `cost_units` | `cost_micros / 10^6` |
//!
//! `geo` (optional) maps a country to the networks known to be there, e.g.
//! `{"geo": {"US": ["203.0.113.0/24"]}}`; without it `country_mismatch` is always 0.
//!
//! The definitions the risk model shares with billing's gradient-boosted model
//! (`ua_bot`, `ua_empty`, `ua_device_mismatch`, `ip_v6`, the hour, `cost_units`, and
//! `ip_rate` = `ip_minute_clicks` in billing) are functions of [`features`], which also
//! computes that model's whole vector ([`features::vector`]).
//!
//! The code, one module per part, everything re-exported here but [`features`]: `spec` (the file format
//! and its validation), `risk` (the risk model and its features), `blocklist`
//! ([`IpBlocklist`]), `compiled` ([`CompiledRules`], [`Decision`]), `ip_rate`
//! ([`IpRate`]).

mod blocklist;
mod compiled;
pub mod features;
mod ip_rate;
mod risk;
mod spec;

pub use blocklist::*;
pub use compiled::*;
pub use ip_rate::*;
pub use risk::*;
pub use spec::*;

/// Rules in one set, at most.
pub const RULES_MAX: usize = 1024;
/// Longest rule id, in bytes (the raw record's bound).
pub const RULE_ID_BYTES_MAX: usize = 64;
/// Fired rules kept per decision, at most (the raw record's bound). A click that fires
/// more is fraud all the same; the first ones in file order are kept.
pub const FIRED_MAX: usize = 16;
/// `max_clicks_per_minute` of an `ip_rate` rule that does not say (docs/api.md).
pub const IP_RATE_DEFAULT_PER_MINUTE: u32 = 100;
/// Longest user-agent pattern: a longer one could never match a valid click.
pub const UA_PATTERN_BYTES_MAX: usize = crate::event::USER_AGENT_BYTES_MAX;
/// Entries (CIDRs, patterns, ad ids) over all rules of a set, at most.
pub const ENTRIES_MAX: usize = 1_000_000;
/// Longest piece of operator input echoed in an error.
const ERROR_ITEM_CHARS_MAX: usize = 80;
/// False-positive rate of the blocklist's bloom pre-check.
const BLOCKLIST_BLOOM_FP: f64 = 0.01;
const _: () = assert!(RULES_MAX <= u16::MAX as usize);

/// Substrings (ASCII case-insensitive) that make `ua_bot` 1.
pub const BOT_UA_TOKENS: &[&str] = &[
    "bot",
    "crawl",
    "spider",
    "slurp",
    "headless",
    "phantomjs",
    "selenium",
    "puppeteer",
    "playwright",
    "curl/",
    "wget/",
    "python-requests",
    "python-urllib",
    "go-http-client",
    "java/",
    "okhttp",
    "libwww",
    "scrapy",
    "httpclient",
];
const MOBILE_UA_TOKENS: &[&str] = &["mobile", "android", "iphone", "ipad", "ipod"];

#[cfg(test)]
mod tests;
