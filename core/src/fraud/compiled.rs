//! The compiled set every dataplane core and billing evaluate, and its [`Decision`].

use std::collections::HashSet;
use std::fmt;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};

use crate::cidr::CidrSet;
use crate::hash::IdBuildHasher;
use crate::Click;

use super::risk::contains_any_ci;
use super::spec::check_spec;
use super::*;

type IdSet = HashSet<u64, IdBuildHasher>;

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
    pub(super) fn fire(&mut self, r: u16) {
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
    /// Unique per compiled set in this process: a [`UaCache`] filled from another set is
    /// emptied before use.
    instance: u64,
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
        static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut c = CompiledRules {
            version: set.version,
            instance: INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
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
                        let ac = features::ua_token_automaton()
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

    /// [`CompiledRules::evaluate`] with the user agent's facts from `cache` (the same
    /// decision; the stream's gate, where a core sees the same few user agents again
    /// and again).
    #[inline]
    pub fn evaluate_cached(
        &self,
        click: &Click<'_>,
        ip_clicks: u32,
        cache: &mut UaCache,
    ) -> Decision {
        let ua = cache.facts(self, &click.user_agent);
        let mut d = self.evaluate_static_with(click, ip_clicks, &ua);
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
            (f.bot, f.mobile) = features::ua_tokens(ac, user_agent);
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

/// User agents cached per slot, at most; longer ones are scanned every time.
pub const UA_CACHE_SLOTS: usize = 256;
/// Longest user agent a slot holds, in bytes.
pub const UA_CACHED_BYTES_MAX: usize = 192;

struct UaSlot {
    /// 0: empty.
    len: u16,
    text: [u8; UA_CACHED_BYTES_MAX],
    facts: UaFacts,
}

/// The [`UaFacts`] of recently judged user agents, for one thread (a dataplane core):
/// direct-mapped, [`UA_CACHE_SLOTS`] slots of the whole text (up to
/// [`UA_CACHED_BYTES_MAX`] bytes), so a hit is a hash and a comparison instead of the
/// automaton scans, and the answer is exactly the scan's (the text is compared, never
/// just its hash). Memory: [`UaCache::memory_bytes`], allocated once. A user agent that
/// collides with another only costs the scan; a set of rules other than the one that
/// filled it empties it first.
pub struct UaCache {
    instance: u64,
    slots: Box<[UaSlot]>,
    pub hits: u64,
    pub misses: u64,
}

impl Default for UaCache {
    fn default() -> Self {
        UaCache::new()
    }
}

impl UaCache {
    pub fn new() -> UaCache {
        UaCache {
            instance: 0,
            slots: (0..UA_CACHE_SLOTS)
                .map(|_| UaSlot {
                    len: 0,
                    text: [0; UA_CACHED_BYTES_MAX],
                    facts: UaFacts::default(),
                })
                .collect(),
            hits: 0,
            misses: 0,
        }
    }

    pub fn memory_bytes() -> usize {
        UA_CACHE_SLOTS * std::mem::size_of::<UaSlot>()
    }

    /// `rules.ua_facts(ua)`, from the cache when `ua` is in it.
    #[inline]
    pub fn facts(&mut self, rules: &CompiledRules, ua: &str) -> UaFacts {
        if rules.ua.is_none() && rules.model_ua.is_none() {
            return UaFacts::default();
        }
        let b = ua.as_bytes();
        if b.is_empty() || b.len() > UA_CACHED_BYTES_MAX {
            return rules.ua_facts(ua);
        }
        if self.instance != rules.instance {
            for s in self.slots.iter_mut() {
                s.len = 0;
            }
            self.instance = rules.instance;
        }
        let slot = &mut self.slots[text_hash(b) as usize % UA_CACHE_SLOTS];
        if usize::from(slot.len) == b.len() && slot.text[..b.len()] == *b {
            self.hits += 1;
            return slot.facts;
        }
        self.misses += 1;
        let f = rules.ua_facts(ua);
        slot.len = b.len() as u16;
        slot.text[..b.len()].copy_from_slice(b);
        slot.facts = f;
        f
    }
}

/// A fast hash of a short text (8 bytes at a time); only picks a slot.
#[inline]
fn text_hash(b: &[u8]) -> u64 {
    let mut h = b.len() as u64;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 32)
}
