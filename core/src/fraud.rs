//! Fraud rules (docs/api.md, docs/fraud.md): the rule-set file format, its validation, the compiled
//! form every dataplane core and billing evaluate, and the per-IP minute counter.
//!
//! - [`RuleSet::parse`] reads the operator's JSON file (the contract's format, plus an
//!   optional `version`), validating every rule; one bad rule refuses the whole set with
//!   a [`RuleError`] that names the rule and the problem.
//! - [`CompiledRules::compile`] builds the immutable matcher: exact prefix sets
//!   ([`CidrSet`]; the bloom-fronted [`IpBlocklist`] measured slower, see its doc), one
//!   Aho-Corasick automaton over every user-agent pattern (ASCII case-insensitive, a DFA
//!   while small), honeypot ad-id sets, per-IP rate thresholds and logistic-regression
//!   risk models.
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

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};
use serde::{Deserialize, Serialize};

use crate::bloom::{bloom_params, BloomFilter};
use crate::cidr::{CidrSet, Network};
use crate::hash::mix64;
use crate::ratelimit::SpinCell;
use crate::{Click, Device};

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

// ---------------------------------------------------------------------------------------
// The file format.

/// A parsed, validated rule set: the rules file (docs/api.md) plus the version the controlplane
/// assigns (0 in an operator's file).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleSet {
    pub version: u64,
    pub rules: Vec<Rule>,
}

/// One rule: its operator-chosen id and what it matches.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rule {
    pub id: String,
    #[serde(flatten)]
    pub spec: RuleSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RuleSpec {
    /// IPv4/IPv6 addresses and networks.
    IpBlock { cidrs: Vec<String> },
    /// Case-insensitive (ASCII) substrings of the user agent.
    UserAgent { patterns: Vec<String> },
    /// Ads no human sees: any click on them is fraud.
    Honeypot { ad_ids: Vec<u64> },
    /// Clicks of one IP per UTC minute of event time, at most.
    IpRate {
        #[serde(default = "ip_rate_default")]
        max_clicks_per_minute: u32,
    },
    /// A logistic-regression score with a threshold.
    RiskModel { threshold: f64, model: ModelSpec },
}

fn ip_rate_default() -> u32 {
    IP_RATE_DEFAULT_PER_MINUTE
}

/// The `model` of a `risk_model` rule (see the module documentation for the features).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default)]
    pub bias: f64,
    pub weights: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub geo: BTreeMap<String, Vec<String>>,
}

impl RuleSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            RuleSpec::IpBlock { .. } => "ip_block",
            RuleSpec::UserAgent { .. } => "user_agent",
            RuleSpec::Honeypot { .. } => "honeypot",
            RuleSpec::IpRate { .. } => "ip_rate",
            RuleSpec::RiskModel { .. } => "risk_model",
        }
    }

    fn entries(&self) -> usize {
        match self {
            RuleSpec::IpBlock { cidrs } => cidrs.len(),
            RuleSpec::UserAgent { patterns } => patterns.len(),
            RuleSpec::Honeypot { ad_ids } => ad_ids.len(),
            RuleSpec::IpRate { .. } => 1,
            RuleSpec::RiskModel { model, .. } => {
                model.weights.len() + model.geo.values().map(Vec::len).sum::<usize>()
            }
        }
    }
}

/// Why a rule set was refused. Always names the rule (by id, and by position) when one
/// rule is at fault.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    #[error("not valid JSON at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{0}")]
    File(String),
    #[error("{}: {problem}", rule_name(*.index, .id.as_deref()))]
    Rule {
        /// 0-based position in `rules`.
        index: usize,
        id: Option<String>,
        problem: String,
    },
}

fn rule_name(index: usize, id: Option<&str>) -> String {
    match id {
        Some(id) => format!("rule \"{id}\" (#{index})"),
        None => format!("rule #{index}"),
    }
}

impl RuleError {
    /// The id of the rule at fault, if one is.
    pub fn rule_id(&self) -> Option<&str> {
        match self {
            RuleError::Rule { id, .. } => id.as_deref(),
            _ => None,
        }
    }

    fn rule(index: usize, id: Option<&str>, problem: impl Into<String>) -> RuleError {
        RuleError::Rule {
            index,
            id: id.map(str::to_owned),
            problem: problem.into(),
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(ERROR_ITEM_CHARS_MAX).collect()
}

impl RuleSet {
    pub fn empty() -> RuleSet {
        RuleSet {
            version: 0,
            rules: Vec::new(),
        }
    }

    /// Parses and validates a rules file: `{"version"?: N, "rules": [...]}`.
    pub fn parse(text: &str) -> Result<RuleSet, RuleError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| RuleError::Syntax {
                line: e.line(),
                column: e.column(),
                message: strip_position(&e.to_string()),
            })?;
        RuleSet::from_value(value)
    }

    /// Validates an already parsed JSON document (see [`RuleSet::parse`]).
    pub fn from_value(value: serde_json::Value) -> Result<RuleSet, RuleError> {
        let serde_json::Value::Object(mut top) = value else {
            return Err(RuleError::File(
                "the rules file must be a JSON object {\"rules\": [...]}".into(),
            ));
        };
        let version = match top.remove("version") {
            None => 0,
            Some(v) => v.as_u64().ok_or_else(|| {
                RuleError::File("\"version\" must be a non-negative integer".into())
            })?,
        };
        let rules = match top.remove("rules") {
            Some(serde_json::Value::Array(a)) => a,
            Some(_) => return Err(RuleError::File("\"rules\" must be an array".into())),
            None => return Err(RuleError::File("missing \"rules\" array".into())),
        };
        if let Some(k) = top.keys().next() {
            return Err(RuleError::File(format!(
                "unknown top-level field \"{}\" (expected \"rules\" and optionally \"version\")",
                clip(k)
            )));
        }
        if rules.len() > RULES_MAX {
            return Err(RuleError::File(format!(
                "{} rules: at most {RULES_MAX} per set",
                rules.len()
            )));
        }
        let mut out = Vec::with_capacity(rules.len());
        let mut seen = HashSet::new();
        let mut entries = 0usize;
        for (index, raw) in rules.into_iter().enumerate() {
            let rule = parse_rule(index, raw)?;
            if !seen.insert(rule.id.clone()) {
                return Err(RuleError::rule(
                    index,
                    Some(&rule.id),
                    "duplicate id: every rule needs its own",
                ));
            }
            entries += rule.spec.entries();
            if entries > ENTRIES_MAX {
                return Err(RuleError::rule(
                    index,
                    Some(&rule.id),
                    format!("the set holds more than {ENTRIES_MAX} entries"),
                ));
            }
            out.push(rule);
        }
        Ok(RuleSet {
            version,
            rules: out,
        })
    }

    /// The file text: `{"version":N,"rules":[...]}`, one rule per line, which
    /// [`RuleSet::parse`] reads back to an equal set.
    pub fn to_json(&self) -> String {
        let mut s = format!("{{\"version\":{},\"rules\":[", self.version);
        for (i, r) in self.rules.iter().enumerate() {
            s.push_str(if i == 0 { "\n  " } else { ",\n  " });
            s.push_str(&serde_json::to_string(r).expect("rules serialise"));
        }
        s.push_str("\n]}\n");
        s
    }

    /// Validates by compiling: some problems (an automaton too large) only show there.
    pub fn compile(&self) -> Result<CompiledRules, RuleError> {
        CompiledRules::compile(self)
    }
}

/// serde_json appends " at line L column C"; the error carries them as fields.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Validates a rule id: what may appear in a Prometheus label and the raw record.
pub fn check_rule_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("id is empty".into());
    }
    if id.len() > RULE_ID_BYTES_MAX {
        return Err(format!("id is longer than {RULE_ID_BYTES_MAX} bytes"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return Err("id may only hold ASCII letters, digits and _ - . :".into());
    }
    Ok(())
}

fn parse_rule(index: usize, raw: serde_json::Value) -> Result<Rule, RuleError> {
    let serde_json::Value::Object(mut obj) = raw else {
        return Err(RuleError::rule(index, None, "a rule must be a JSON object"));
    };
    let id = match obj.remove("id") {
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(RuleError::rule(index, None, "\"id\" must be a string")),
        None => return Err(RuleError::rule(index, None, "missing \"id\"")),
    };
    check_rule_id(&id).map_err(|p| {
        let shown = clip(&id);
        RuleError::rule(index, None, format!("bad id \"{shown}\": {p}"))
    })?;
    let bad = |p: String| RuleError::rule(index, Some(&id), p);
    if !obj.contains_key("kind") {
        return Err(bad(
            "missing \"kind\" (ip_block, user_agent, honeypot, ip_rate or risk_model)".into(),
        ));
    }
    let spec =
        RuleSpec::deserialize(serde_json::Value::Object(obj)).map_err(|e| bad(e.to_string()))?;
    check_spec(&spec).map_err(bad)?;
    Ok(Rule { id, spec })
}

fn check_spec(spec: &RuleSpec) -> Result<(), String> {
    match spec {
        RuleSpec::IpBlock { cidrs } => {
            if cidrs.is_empty() {
                return Err("\"cidrs\" is empty".into());
            }
            CidrSet::parse_list(cidrs).map_err(|e| e.to_string())?;
        }
        RuleSpec::UserAgent { patterns } => {
            if patterns.is_empty() {
                return Err("\"patterns\" is empty".into());
            }
            for p in patterns {
                if p.is_empty() {
                    return Err("empty pattern: it would match every click".into());
                }
                if p.len() > UA_PATTERN_BYTES_MAX {
                    return Err(format!(
                        "pattern \"{}...\" is longer than {UA_PATTERN_BYTES_MAX} bytes: no user agent could match it",
                        clip(p)
                    ));
                }
            }
        }
        RuleSpec::Honeypot { ad_ids } => {
            if ad_ids.is_empty() {
                return Err("\"ad_ids\" is empty".into());
            }
        }
        RuleSpec::IpRate {
            max_clicks_per_minute,
        } => {
            if *max_clicks_per_minute == 0 {
                return Err("max_clicks_per_minute must be at least 1".into());
            }
        }
        RuleSpec::RiskModel { threshold, model } => {
            if !(threshold.is_finite() && *threshold > 0.0 && *threshold <= 1.0) {
                return Err(format!("threshold must be in (0, 1], got {threshold}"));
            }
            if !model.bias.is_finite() {
                return Err("model.bias must be a finite number".into());
            }
            if model.weights.is_empty() {
                return Err("model.weights is empty".into());
            }
            for (name, w) in &model.weights {
                if Feature::parse(name).is_none() {
                    return Err(format!(
                        "unknown model feature \"{}\" (known: {})",
                        clip(name),
                        Feature::ALL.map(Feature::name).join(", ")
                    ));
                }
                if !w.is_finite() {
                    return Err(format!("weight of \"{name}\" must be a finite number"));
                }
            }
            for (country, cidrs) in &model.geo {
                let b = country.as_bytes();
                if b.len() != 2 || !b.iter().all(u8::is_ascii_uppercase) {
                    return Err(format!(
                        "model.geo key \"{}\" is not a two-letter uppercase country code",
                        clip(country)
                    ));
                }
                CidrSet::parse_list(cidrs).map_err(|e| format!("model.geo {country}: {e}"))?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The risk model.

/// The model's inputs (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    UaBot,
    UaEmpty,
    UaShort,
    UaDeviceMismatch,
    IpRate,
    IpV6,
    HourNight,
    CountryMismatch,
    DeviceCtv,
    DeviceOther,
    CostUnits,
}

impl Feature {
    pub const ALL: [Feature; 11] = [
        Feature::UaBot,
        Feature::UaEmpty,
        Feature::UaShort,
        Feature::UaDeviceMismatch,
        Feature::IpRate,
        Feature::IpV6,
        Feature::HourNight,
        Feature::CountryMismatch,
        Feature::DeviceCtv,
        Feature::DeviceOther,
        Feature::CostUnits,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::UaBot => "ua_bot",
            Feature::UaEmpty => "ua_empty",
            Feature::UaShort => "ua_short",
            Feature::UaDeviceMismatch => "ua_device_mismatch",
            Feature::IpRate => "ip_rate",
            Feature::IpV6 => "ip_v6",
            Feature::HourNight => "hour_night",
            Feature::CountryMismatch => "country_mismatch",
            Feature::DeviceCtv => "device_ctv",
            Feature::DeviceOther => "device_other",
            Feature::CostUnits => "cost_units",
        }
    }

    pub fn parse(s: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// A compiled logistic-regression model.
#[derive(Clone, Debug)]
pub struct RiskModel {
    bias: f64,
    weights: Vec<(Feature, f64)>,
    threshold: f64,
    /// The logit at the threshold: comparing logits skips the exponential.
    threshold_logit: f64,
    geo: Vec<([u8; 2], CidrSet)>,
}

impl RiskModel {
    fn compile(threshold: f64, spec: &ModelSpec) -> RiskModel {
        let geo = spec
            .geo
            .iter()
            .map(|(c, cidrs)| {
                let b = c.as_bytes();
                ([b[0], b[1]], CidrSet::parse_list(cidrs).expect("validated"))
            })
            .collect();
        RiskModel {
            bias: spec.bias,
            weights: spec
                .weights
                .iter()
                .map(|(n, w)| (Feature::parse(n).expect("validated"), *w))
                .collect(),
            threshold,
            threshold_logit: if threshold >= 1.0 {
                f64::INFINITY
            } else {
                (threshold / (1.0 - threshold)).ln()
            },
            geo,
        }
    }

    fn logit(&self, f: &Features) -> f64 {
        self.bias
            + self
                .weights
                .iter()
                .map(|&(feat, w)| w * f.value(feat, self))
                .sum::<f64>()
    }

    /// The score in [0, 1].
    pub fn score(&self, f: &Features) -> f64 {
        1.0 / (1.0 + (-self.logit(f)).exp())
    }

    /// score ≥ threshold, decided on the logit (monotone) so no exponential is needed;
    /// a threshold of exactly 1 is reached only by a score that rounds to 1.
    pub fn fires(&self, f: &Features) -> bool {
        if self.threshold_logit.is_infinite() {
            return self.score(f) >= self.threshold;
        }
        self.logit(f) >= self.threshold_logit
    }

    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    fn country_mismatch(&self, click: &Click<'_>) -> bool {
        self.geo
            .iter()
            .any(|(c, set)| *c != click.country && set.contains(click.ip))
    }
}

/// The per-click inputs of the models, computed once per click when a model exists.
pub struct Features<'c, 'a> {
    click: &'c Click<'a>,
    ua_bot: bool,
    ua_mobile: bool,
    ip_clicks: u32,
}

impl Features<'_, '_> {
    fn value(&self, f: Feature, model: &RiskModel) -> f64 {
        let c = self.click;
        let b = |v: bool| if v { 1.0 } else { 0.0 };
        match f {
            Feature::UaBot => b(self.ua_bot),
            Feature::UaEmpty => b(c.user_agent.is_empty()),
            Feature::UaShort => b(c.user_agent.len() < 16),
            Feature::UaDeviceMismatch => b(match c.device {
                Device::Mobile | Device::Tablet => !self.ua_mobile,
                Device::Desktop => self.ua_mobile,
                _ => false,
            }),
            Feature::IpRate => self.ip_clicks as f64,
            Feature::IpV6 => b(matches!(c.ip, IpAddr::V6(a) if a.to_ipv4_mapped().is_none())),
            Feature::HourNight => b((c.ts_ms / 3_600_000) % 24 < 6),
            Feature::CountryMismatch => b(model.country_mismatch(c)),
            Feature::DeviceCtv => b(c.device == Device::Ctv),
            Feature::DeviceOther => b(c.device == Device::Other),
            Feature::CostUnits => c.cost_micros as f64 / 1e6,
        }
    }
}

fn contains_any_ci(hay: &str, needles: &[&str]) -> bool {
    let hay = hay.as_bytes();
    needles.iter().any(|n| {
        let n = n.as_bytes();
        hay.len() >= n.len() && hay.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
    })
}

// ---------------------------------------------------------------------------------------
// The IP blocklist.

use crate::cidr::{mask128, mask32};

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

// ---------------------------------------------------------------------------------------
// The compiled set.

/// A fixed hasher for ad ids (already well spread after mixing).
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        mix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
}

type IdSet = HashSet<u64, BuildHasherDefault<IdHasher>>;

/// What one click was judged: fraud or not, and the rules that fired (indices into the
/// set, in file order, at most [`FIRED_MAX`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    fired: [u16; FIRED_MAX],
    n: u8,
    /// More than [`FIRED_MAX`] rules fired: some were not kept.
    truncated: bool,
}

impl Default for Decision {
    fn default() -> Self {
        Decision {
            fired: [0; FIRED_MAX],
            n: 0,
            truncated: false,
        }
    }
}

impl Decision {
    pub fn fraud(&self) -> bool {
        self.n > 0
    }

    /// Indices of the fired rules ([`CompiledRules::rule_id`]), ascending.
    pub fn fired(&self) -> &[u16] {
        &self.fired[..self.n as usize]
    }

    /// True when more than [`FIRED_MAX`] rules fired and only the first were kept.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Adds rule `r` unless present, keeping the list sorted and bounded (the smallest
    /// indices win, so the kept ids do not depend on evaluation order).
    #[inline]
    fn fire(&mut self, r: u16) {
        let n = self.n as usize;
        let at = self.fired[..n].partition_point(|&x| x < r);
        if at < n && self.fired[at] == r {
            return;
        }
        if n == FIRED_MAX {
            self.truncated = true;
            if at == n {
                return;
            }
        } else {
            self.n += 1;
        }
        let end = (self.n as usize).min(FIRED_MAX);
        self.fired.copy_within(at..end - 1, at + 1);
        self.fired[at] = r;
    }
}

/// What the rules read from one user agent ([`CompiledRules::ua_facts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UaFacts {
    /// The `user_agent` rules whose patterns it contains.
    rules: Decision,
    /// A bot token of the models.
    bot: bool,
    /// A mobile token of the models.
    mobile: bool,
}

/// The immutable, compiled form of a [`RuleSet`]: what every core swaps in whole.
#[derive(Debug)]
pub struct CompiledRules {
    version: u64,
    ids: Vec<String>,
    kinds: Vec<&'static str>,
    /// Exact prefix sets: measured faster than the bloom-fronted [`IpBlocklist`] (see
    /// `bench/benches/fraud.rs`), so the compiled set uses them directly.
    blocklists: Vec<(u16, CidrSet)>,
    /// One automaton over the patterns of every `user_agent` rule, and for each pattern
    /// its rule.
    ua: Option<(AhoCorasick, Vec<u16>)>,
    ua_rules: usize,
    honeypots: Vec<(u16, IdSet)>,
    ip_rates: Vec<(u16, u32)>,
    models: Vec<(u16, RiskModel)>,
    /// Bot tokens then mobile tokens, in one automaton: one scan of the user agent
    /// gives both `ua_bot` and `ua_device_mismatch`.
    model_ua: Option<AhoCorasick>,
    /// A model reads `ip_rate`, or an `ip_rate` rule exists: the stream must count.
    needs_ip_rate: bool,
    /// The most rule-id bytes a record of this set can carry (u8 length + id, for the
    /// FIRED_MAX longest ids), to reserve log space before evaluating.
    fired_bytes_max: usize,
}

impl CompiledRules {
    /// The set with no rules: nothing is fraud.
    pub fn empty() -> CompiledRules {
        CompiledRules::compile(&RuleSet::empty()).expect("the empty set compiles")
    }

    pub fn compile(set: &RuleSet) -> Result<CompiledRules, RuleError> {
        let mut c = CompiledRules {
            version: set.version,
            ids: set.rules.iter().map(|r| r.id.clone()).collect(),
            kinds: set.rules.iter().map(|r| r.spec.kind()).collect(),
            blocklists: Vec::new(),
            ua: None,
            ua_rules: 0,
            honeypots: Vec::new(),
            ip_rates: Vec::new(),
            models: Vec::new(),
            model_ua: None,
            needs_ip_rate: false,
            fired_bytes_max: 0,
        };
        let mut patterns: Vec<&str> = Vec::new();
        let mut pattern_rule: Vec<u16> = Vec::new();
        for (i, rule) in set.rules.iter().enumerate() {
            let r = i as u16;
            let bad = |p: String| RuleError::rule(i, Some(&rule.id), p);
            check_rule_id(&rule.id).map_err(&bad)?;
            check_spec(&rule.spec).map_err(&bad)?;
            match &rule.spec {
                RuleSpec::IpBlock { cidrs } => {
                    let bl = CidrSet::parse_list(cidrs).map_err(|e| bad(e.to_string()))?;
                    c.blocklists.push((r, bl));
                }
                RuleSpec::UserAgent { patterns: p } => {
                    c.ua_rules += 1;
                    for pat in p {
                        patterns.push(pat);
                        pattern_rule.push(r);
                    }
                }
                RuleSpec::Honeypot { ad_ids } => {
                    c.honeypots.push((r, ad_ids.iter().copied().collect()));
                }
                RuleSpec::IpRate {
                    max_clicks_per_minute,
                } => {
                    c.ip_rates.push((r, *max_clicks_per_minute));
                    c.needs_ip_rate = true;
                }
                RuleSpec::RiskModel { threshold, model } => {
                    let m = RiskModel::compile(*threshold, model);
                    c.needs_ip_rate |= m.weights.iter().any(|w| w.0 == Feature::IpRate);
                    let reads_ua = m
                        .weights
                        .iter()
                        .any(|w| matches!(w.0, Feature::UaBot | Feature::UaDeviceMismatch));
                    if reads_ua && c.model_ua.is_none() {
                        let tokens: Vec<&str> = BOT_UA_TOKENS
                            .iter()
                            .chain(MOBILE_UA_TOKENS)
                            .copied()
                            .collect();
                        // Short common-letter tokens: a prefilter would fire on
                        // every few bytes; the plain DFA scan is faster.
                        let ac = AhoCorasickBuilder::new()
                            .ascii_case_insensitive(true)
                            .kind(Some(AhoCorasickKind::DFA))
                            .prefilter(false)
                            .build(&tokens)
                            .map_err(|e| bad(format!("model tokens: {e}")))?;
                        c.model_ua = Some(ac);
                    }
                    c.models.push((r, m));
                }
            }
        }
        if !patterns.is_empty() {
            let ac = ci_automaton(&patterns).map_err(|e| {
                let i = pattern_rule[0] as usize;
                RuleError::rule(i, Some(&set.rules[i].id), e)
            })?;
            c.ua = Some((ac, pattern_rule));
        }
        let mut lens: Vec<usize> = c.ids.iter().map(|id| 1 + id.len()).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        c.fired_bytes_max = lens.iter().take(FIRED_MAX).sum();
        Ok(c)
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn rule_id(&self, r: u16) -> &str {
        &self.ids[r as usize]
    }

    pub fn rule_ids(&self) -> &[String] {
        &self.ids
    }

    pub fn rule_kind(&self, r: u16) -> &'static str {
        self.kinds[r as usize]
    }

    /// True when [`CompiledRules::evaluate`] needs the IP's click count (an `ip_rate`
    /// rule or a model reading `ip_rate`); otherwise the caller may pass 0.
    pub fn needs_ip_rate(&self) -> bool {
        self.needs_ip_rate
    }

    /// `(rule index, max_clicks_per_minute)` of every `ip_rate` rule: billing applies
    /// docs/fraud.md's exact rule with them.
    pub fn ip_rate_rules(&self) -> &[(u16, u32)] {
        &self.ip_rates
    }

    /// Upper bound of the rule-id bytes one record of this set carries
    /// (`Σ 1 + id.len()` over the FIRED_MAX longest ids).
    pub fn fired_bytes_max(&self) -> usize {
        self.fired_bytes_max
    }

    /// Judges one click of the stream. `ip_clicks` is this IP's click count in the
    /// click's UTC minute, this click included ([`IpRate::hit`]): an `ip_rate` rule fires
    /// once it exceeds the rule's threshold (the 101st click with 100).
    #[inline]
    pub fn evaluate(&self, click: &Click<'_>, ip_clicks: u32) -> Decision {
        let mut d = self.evaluate_static(click, ip_clicks);
        for &(r, max) in &self.ip_rates {
            if ip_clicks > max {
                d.fire(r);
            }
        }
        d
    }

    /// Every rule but `ip_rate`: what billing evaluates per click before applying the
    /// exact per-minute rule itself. `ip_clicks` feeds the models' `ip_rate` feature.
    #[inline]
    pub fn evaluate_static(&self, click: &Click<'_>, ip_clicks: u32) -> Decision {
        self.evaluate_static_with(click, ip_clicks, &self.ua_facts(&click.user_agent))
    }

    /// What the rules read from a user agent (the `user_agent` rules that match it, the
    /// models' bot and mobile tokens): the only part of a judgement that scans text.
    /// A caller judging many clicks of few distinct user agents (billing reads them
    /// dictionary-encoded) computes it once per user agent and passes it to
    /// [`CompiledRules::evaluate_static_with`]; the result is the same as scanning
    /// each click's user agent.
    pub fn ua_facts(&self, user_agent: &str) -> UaFacts {
        let mut f = UaFacts::default();
        let ua = user_agent.as_bytes();
        if let Some((ac, rule_of)) = &self.ua {
            if self.ua_rules == 1 {
                if let Some(m) = ac.find(ua) {
                    f.rules.fire(rule_of[m.pattern().as_usize()]);
                }
            } else {
                for m in ac.find_overlapping_iter(ua) {
                    f.rules.fire(rule_of[m.pattern().as_usize()]);
                }
            }
        }
        if let Some(ac) = &self.model_ua {
            for m in ac.find_overlapping_iter(ua) {
                if m.pattern().as_usize() < BOT_UA_TOKENS.len() {
                    f.bot = true;
                } else {
                    f.mobile = true;
                }
            }
        }
        f
    }

    /// [`CompiledRules::evaluate_static`] with the click's user-agent facts already
    /// computed (`ua` must be [`CompiledRules::ua_facts`] of `click.user_agent` under
    /// this set).
    #[inline]
    pub fn evaluate_static_with(
        &self,
        click: &Click<'_>,
        ip_clicks: u32,
        ua: &UaFacts,
    ) -> Decision {
        let mut d = Decision::default();
        for (r, bl) in &self.blocklists {
            if bl.contains(click.ip) {
                d.fire(*r);
            }
        }
        // The kept ids are the smallest whatever the order they fire in, and a
        // truncated set of user-agent rules truncates the decision as well.
        for &r in ua.rules.fired() {
            d.fire(r);
        }
        d.truncated |= ua.rules.truncated;
        for (r, set) in &self.honeypots {
            if set.contains(&click.ad_id) {
                d.fire(*r);
            }
        }
        if !self.models.is_empty() {
            let f = Features {
                click,
                ua_bot: ua.bot,
                ua_mobile: ua.mobile,
                ip_clicks,
            };
            for (r, m) in &self.models {
                if m.fires(&f) {
                    d.fire(*r);
                }
            }
        }
        d
    }

    /// The score of model rule `r` for a click (tests, explanations).
    pub fn model_score(&self, r: u16, click: &Click<'_>, ip_clicks: u32) -> Option<f64> {
        let (_, m) = self.models.iter().find(|(i, _)| *i == r)?;
        let f = Features {
            click,
            ua_bot: contains_any_ci(&click.user_agent, BOT_UA_TOKENS),
            ua_mobile: contains_any_ci(&click.user_agent, MOBILE_UA_TOKENS),
            ip_clicks,
        };
        Some(m.score(&f))
    }
}

/// Pattern bytes up to which the automaton is a full DFA (about one byte-class row of
/// 4-byte transitions per pattern byte: ~10 MiB at this bound); past it, the contiguous
/// NFA, slower per byte but linear in memory.
const UA_DFA_PATTERN_BYTES_MAX: usize = 64 << 10;

/// One case-insensitive (ASCII) automaton; a DFA while the patterns are small enough,
/// so a scan costs about one table lookup per user-agent byte.
fn ci_automaton<P: AsRef<[u8]>>(patterns: &[P]) -> Result<AhoCorasick, String> {
    let bytes: usize = patterns.iter().map(|p| p.as_ref().len()).sum();
    let kind = (bytes <= UA_DFA_PATTERN_BYTES_MAX).then_some(AhoCorasickKind::DFA);
    AhoCorasickBuilder::new()
        .ascii_case_insensitive(true)
        .match_kind(MatchKind::Standard)
        .kind(kind)
        .build(patterns)
        .map_err(|e| format!("user-agent patterns: {e}"))
}

impl fmt::Display for CompiledRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rules v{} ({} rules)", self.version, self.ids.len())
    }
}

// ---------------------------------------------------------------------------------------
// The per-IP minute counter.

/// Slots per set, scanned linearly.
const IP_RATE_WAYS: usize = 8;

#[derive(Clone, Copy, Default)]
struct RateSlot {
    key: u128,
    /// UTC minute (ts_ms / 60000) and clicks in it, for the latest minute seen and the
    /// one before (events arrive a little out of order).
    minute: u64,
    count: u32,
    prev_count: u32,
    /// Table tick of the last hit: the least recently hit slot of a set is evicted.
    touched: u64,
    used: bool,
}

/// The slots of one set and the set's own tick (for least-recently-hit eviction).
#[derive(Default)]
struct RateSet {
    slots: [RateSlot; IP_RATE_WAYS],
    tick: u64,
}

/// Clicks per (ip, UTC minute of event time) for the whole box: every core counts into
/// the same table, so an address's count (and the `ip_rate` threshold) is the box's,
/// whatever core receives its clicks. A fixed table of at most `addresses_max` addresses
/// (set-associative; a newcomer to a full set evicts the address hit least recently),
/// each set behind its own spin lock ([`SpinCell`]). An evicted address starts again from
/// zero, so eviction only ever under-counts; a flood of addresses costs a bounded table,
/// never growth. Memory: [`IpRate::memory_bytes`].
///
/// Each address keeps its latest minute and the one before; a click older than that is
/// counted as the first of its minute (it cannot be judged by rate in the stream; billing
/// judges it exactly).
pub struct IpRate {
    ways: usize,
    sets: Box<[SpinCell<RateSet>]>,
    tracked: AtomicUsize,
    evictions: AtomicU64,
}

impl IpRate {
    /// A table of `addresses_max` addresses (rounded down to whole sets, at least 1).
    pub fn new(addresses_max: usize) -> IpRate {
        let addresses_max = addresses_max.max(1);
        let ways = IP_RATE_WAYS.min(addresses_max);
        let sets = addresses_max / ways;
        IpRate {
            ways,
            sets: (0..sets)
                .map(|_| SpinCell::new(RateSet::default()))
                .collect(),
            tracked: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// Counts one click of `ip` at event time `ts_ms`; returns the clicks of that IP in
    /// that UTC minute so far, this one included.
    pub fn hit(&self, ip: IpAddr, ts_ms: u64) -> u32 {
        let key = canonical(ip);
        let minute = ts_ms / 60_000;
        let h = mix64(key as u64 ^ mix64((key >> 64) as u64));
        let set = ((h as u128 * self.sets.len() as u128) >> 64) as usize;
        let nways = self.ways;
        self.sets[set].with(|set| {
            set.tick += 1;
            let tick = set.tick;
            let ways = &mut set.slots[..nways];
            if let Some(s) = ways.iter_mut().find(|s| s.used && s.key == key) {
                s.touched = tick;
                return if minute == s.minute {
                    s.count = s.count.saturating_add(1);
                    s.count
                } else if minute > s.minute {
                    s.prev_count = if minute == s.minute + 1 { s.count } else { 0 };
                    s.minute = minute;
                    s.count = 1;
                    1
                } else if minute + 1 == s.minute {
                    s.prev_count = s.prev_count.saturating_add(1);
                    s.prev_count
                } else {
                    1
                };
            }
            let victim = match ways.iter().position(|s| !s.used) {
                Some(i) => {
                    self.tracked.fetch_add(1, Ordering::Relaxed);
                    i
                }
                None => {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    ways.iter()
                        .enumerate()
                        .min_by_key(|(_, s)| s.touched)
                        .map(|(i, _)| i)
                        .expect("a set has ways")
                }
            };
            ways[victim] = RateSlot {
                key,
                minute,
                count: 1,
                prev_count: 0,
                touched: tick,
                used: true,
            };
            1
        })
    }

    /// Addresses holding a slot.
    pub fn tracked(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    /// Addresses evicted to make room since creation.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// The most addresses the table holds.
    pub fn capacity(&self) -> usize {
        self.sets.len() * self.ways
    }

    /// Bytes of the table.
    pub fn memory_bytes(&self) -> usize {
        self.sets.len() * std::mem::size_of::<SpinCell<RateSet>>()
    }
}

fn canonical(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => 0xffff_0000_0000 | u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

// ---------------------------------------------------------------------------------------
// Helpers for callers that hold rules by id (the controlplane's add/delete).

impl RuleSet {
    /// A copy with `rule` added, or replacing the rule with the same id; validated.
    pub fn with_rule(&self, rule: Rule) -> Result<RuleSet, RuleError> {
        let mut rules = self.rules.clone();
        match rules.iter_mut().find(|r| r.id == rule.id) {
            Some(r) => *r = rule,
            None => rules.push(rule),
        }
        RuleSet::revalidate(self.version, rules)
    }

    /// A copy without rule `id`; None when there is no such rule.
    pub fn without_rule(&self, id: &str) -> Option<RuleSet> {
        let at = self.rules.iter().position(|r| r.id == id)?;
        let mut rules = self.rules.clone();
        rules.remove(at);
        Some(RuleSet {
            version: self.version,
            rules,
        })
    }

    fn revalidate(version: u64, rules: Vec<Rule>) -> Result<RuleSet, RuleError> {
        let value = serde_json::json!({ "version": version, "rules": rules });
        RuleSet::from_value(value)
    }

    /// Parses one rule given as JSON text (`{"id":..,"kind":..,...}`).
    pub fn parse_rule(text: &str) -> Result<Rule, RuleError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| RuleError::Syntax {
                line: e.line(),
                column: e.column(),
                message: strip_position(&e.to_string()),
            })?;
        parse_rule(0, value)
    }
}

#[cfg(test)]
mod tests;
