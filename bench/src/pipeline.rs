//! The dataplane's own per-event stages (`clickgate_dataplane::pipeline::ingest`, the
//! function every `POST /v1/click(s)` runs) with one core's state and an in-memory log
//! instead of the disk: parse + validate → dedup (the box-wide bloom) → fraud gate (rule
//! snapshot + per-IP minute counter) → raw record encode + frame crc → pre-aggregation.
//! The criterion bench `pipeline` measures it and `tests/alloc.rs` counts its
//! allocations; neither holds a copy of the stages.

use clickgate_core::agg::{AggConfig, Aggregator};
use clickgate_core::bloom::SharedBloom;
use clickgate_core::fraud::{CompiledRules, IpRate, RuleSet};
use clickgate_core::ratelimit::RateLimiter;
use clickgate_dataplane::metrics::CoreMetrics;
use clickgate_dataplane::pipeline::{
    self, ActiveRules, BoxState, MemLog, Outcome, Scratch, Stages,
};

use crate::corpus::NOW_MS;

/// Event-time skew the corpus is parsed with (its events are up to 5 minutes old).
pub const SKEW_MS: u64 = 300_000;

/// One core's state for the stages, and the box's shared tables.
pub struct Pipeline {
    pub shared: BoxState,
    pub rules: ActiveRules,
    pub agg: Aggregator,
    pub metrics: CoreMetrics,
    log: MemLog,
    scratch: Scratch,
    pub accepted: u64,
    pub duplicates: u64,
    pub fraud: u64,
}

impl Pipeline {
    /// `rules_json`: a rule set for the fraud gate, or `None` for no rules. Sized as the
    /// dataplane's defaults size them for a box taking 10M events per window.
    pub fn new(rules_json: Option<&str>) -> Pipeline {
        let rules = match rules_json {
            Some(j) => RuleSet::parse(j)
                .and_then(|s| s.compile())
                .expect("bench rule set is valid"),
            None => CompiledRules::empty(),
        };
        let metrics = CoreMetrics::default();
        Pipeline {
            shared: BoxState {
                bloom: SharedBloom::new(600_000, 4, 10_000_000, 0.001, NOW_MS),
                ip_rate: IpRate::new(100_000),
                limiter: RateLimiter::new(1000, 65_536),
            },
            rules: ActiveRules::new(rules, &metrics),
            agg: Aggregator::new(AggConfig::default()),
            metrics,
            log: MemLog::new(4 << 20),
            scratch: Scratch::default(),
            accepted: 0,
            duplicates: 0,
            fraud: 0,
        }
    }

    /// Every stage for one request body (`single`: `POST /v1/click`, else NDJSON).
    /// Panics on an invalid body (the corpus is valid).
    #[inline]
    pub fn request(&mut self, single: bool, body: &[u8]) {
        let mut st = Stages {
            shared: &self.shared,
            rules: &self.rules,
            agg: &mut self.agg,
            log: &self.log,
            metrics: &self.metrics,
            ts_skew_ms: SKEW_MS,
        };
        match pipeline::ingest(&mut st, single, body, NOW_MS, &mut self.scratch) {
            Ok(Outcome::Accepted {
                accepted,
                duplicates,
                fraud,
                ..
            }) => {
                assert!(self.scratch.rejected.is_empty(), "bench event invalid");
                self.accepted += accepted;
                self.duplicates += duplicates;
                self.fraud += fraud;
            }
            Ok(Outcome::Invalid) => panic!("bench event invalid: {:?}", self.scratch.rejected),
            Err(e) => panic!("in-memory log refused: {e:?}"),
        }
    }

    /// One event line, as `POST /v1/click` runs it.
    #[inline]
    pub fn event(&mut self, line: &[u8]) {
        self.request(true, line);
    }

    /// What the shipper does every ≤ 1 s: take the delta, hand its storage back.
    pub fn ship(&mut self) -> usize {
        let delta = self.agg.drain_delta();
        let n = delta.entries.len();
        self.agg.recycle(delta);
        n
    }
}
