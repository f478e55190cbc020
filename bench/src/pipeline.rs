//! The dataplane's per-event stages in the order `dataplane::shard` runs them, without
//! the network, the executor and the disk: parse + validate → dedup (bloom shard) →
//! fraud gate (rule snapshot + per-IP minute counter) → raw record encode + frame crc into
//! a log-sized buffer → pre-aggregation. The criterion bench `pipeline` measures it and
//! `tests/alloc.rs` counts its allocations.

use clickgate_core::agg::{AggConfig, Aggregator};
use clickgate_core::bloom::RotatingBloom;
use clickgate_core::fraud::{CompiledRules, Decision, IpRate, RuleSet, FIRED_MAX};
use clickgate_core::hash::event_hash;
use clickgate_core::parse::parse_click;
use clickgate_proto::record::{encode_into, encoded_len};
use clickgate_proto::segment::{put_frame_header, FRAME_HEADER_BYTES};
use clickgate_proto::Flags;

use crate::corpus::NOW_MS;

/// Event-time skew the corpus is parsed with (its events are up to 5 minutes old).
pub const SKEW_MS: u64 = 300_000;

/// One core's state for the stages.
pub struct Pipeline {
    pub bloom: RotatingBloom,
    pub agg: Aggregator,
    pub rules: Option<CompiledRules>,
    pub ip_rate: IpRate,
    log: Vec<u8>,
    at: usize,
    pub accepted: u64,
    pub duplicates: u64,
    pub fraud: u64,
}

impl Pipeline {
    /// `rules_json`: a rule set (contract §4) for the fraud gate, or `None` for no rules.
    pub fn new(rules_json: Option<&str>) -> Pipeline {
        let rules = rules_json.map(|j| {
            RuleSet::parse(j)
                .and_then(|s| s.compile())
                .expect("bench rule set is valid")
        });
        Pipeline {
            bloom: RotatingBloom::new(600_000, 4, 10_000_000, 0.001, NOW_MS),
            agg: Aggregator::new(AggConfig::default()),
            rules,
            ip_rate: IpRate::new(100_000),
            log: vec![0u8; 4 << 20],
            at: 0,
            accepted: 0,
            duplicates: 0,
            fraud: 0,
        }
    }

    /// Every stage for one event line. Panics on an invalid line (the corpus is valid).
    #[inline]
    pub fn event(&mut self, line: &[u8]) {
        let click = match parse_click(line, NOW_MS, SKEW_MS) {
            Ok(c) => c,
            Err(e) => panic!("bench event invalid: {e}"),
        };
        let dup = self
            .bloom
            .check_and_insert(event_hash(&click.event_id), NOW_MS);
        let (flags, decision) = if dup {
            (Flags::default().with_duplicate(true), Decision::default())
        } else if let Some(rules) = &self.rules {
            let ip_clicks = if rules.needs_ip_rate() {
                self.ip_rate.hit(click.ip, click.ts_ms)
            } else {
                0
            };
            let d = rules.evaluate(&click, ip_clicks);
            (Flags::default().with_fraud(d.fraud()), d)
        } else {
            (Flags::default(), Decision::default())
        };
        let mut ids = [""; FIRED_MAX];
        if let Some(rules) = &self.rules {
            for (j, &r) in decision.fired().iter().enumerate() {
                ids[j] = rules.rule_id(r);
            }
        }
        let ids = &ids[..decision.fired().len()];
        let len = encoded_len(&click, ids);
        if self.at + FRAME_HEADER_BYTES + len > self.log.len() {
            self.at = 0;
        }
        let (head, payload) =
            self.log[self.at..self.at + FRAME_HEADER_BYTES + len].split_at_mut(FRAME_HEADER_BYTES);
        encode_into(&click, flags, NOW_MS, ids, payload).expect("encode");
        put_frame_header(head, payload);
        self.at += FRAME_HEADER_BYTES + len;
        if dup {
            self.duplicates += 1;
        } else {
            self.accepted += 1;
            self.fraud += u64::from(flags.fraud());
            self.agg.add(&click, !flags.fraud(), flags.fraud());
        }
    }

    /// What the shipper does every ≤ 1 s: take the delta, hand its storage back.
    pub fn ship(&mut self) -> usize {
        let delta = self.agg.drain_delta();
        let n = delta.entries.len();
        self.agg.recycle(delta);
        n
    }
}
