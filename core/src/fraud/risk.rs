//! The risk model: logistic regression over per-click features (see the module
//! documentation of `fraud` for the feature list; the definitions shared with billing's
//! model are functions of [`super::features`]).

use crate::cidr::CidrSet;
use crate::{Click, Device};

use super::*;

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
    pub(super) weights: Vec<(Feature, f64)>,
    threshold: f64,
    /// The logit at the threshold: comparing logits skips the exponential.
    threshold_logit: f64,
    geo: Vec<([u8; 2], CidrSet)>,
}

impl RiskModel {
    pub(super) fn compile(threshold: f64, spec: &ModelSpec) -> RiskModel {
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
    pub(super) click: &'c Click<'a>,
    pub(super) ua_bot: bool,
    pub(super) ua_mobile: bool,
    pub(super) ip_clicks: u32,
}

impl Features<'_, '_> {
    fn value(&self, f: Feature, model: &RiskModel) -> f64 {
        let c = self.click;
        let b = |v: bool| if v { 1.0 } else { 0.0 };
        match f {
            Feature::UaBot => b(self.ua_bot),
            Feature::UaEmpty => b(c.user_agent.is_empty()),
            Feature::UaShort => b(c.user_agent.len() < 16),
            Feature::UaDeviceMismatch => b(features::ua_device_mismatch(c.device, self.ua_mobile)),
            Feature::IpRate => self.ip_clicks as f64,
            Feature::IpV6 => b(features::ip_v6(c.ip)),
            Feature::HourNight => b(features::hour_of_day(c.ts_ms) < 6),
            Feature::CountryMismatch => b(model.country_mismatch(c)),
            Feature::DeviceCtv => b(c.device == Device::Ctv),
            Feature::DeviceOther => b(c.device == Device::Other),
            Feature::CostUnits => features::cost_units(c.cost_micros),
        }
    }
}

pub(super) fn contains_any_ci(hay: &str, needles: &[&str]) -> bool {
    let hay = hay.as_bytes();
    needles.iter().any(|n| {
        let n = n.as_bytes();
        hay.len() >= n.len() && hay.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
    })
}
