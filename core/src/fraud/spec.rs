//! The rule-set file format: parsing and validating an operator's rules file.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::cidr::CidrSet;

use super::*;

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

    pub(super) fn rule(index: usize, id: Option<&str>, problem: impl Into<String>) -> RuleError {
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
        let value = json_value(text)?;
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
/// JSON text to a value; a syntax error names its line and column.
fn json_value(text: &str) -> Result<serde_json::Value, RuleError> {
    serde_json::from_str(text).map_err(|e| RuleError::Syntax {
        line: e.line(),
        column: e.column(),
        message: strip_position(&e.to_string()),
    })
}

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

pub(super) fn check_spec(spec: &RuleSpec) -> Result<(), String> {
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
        let value = json_value(text)?;
        parse_rule(0, value)
    }
}
