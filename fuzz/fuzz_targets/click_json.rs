//! Click JSON: `parse_click` on one event and on every line of an NDJSON batch (the
//! batch parser's line splitting), and the IPv4 fast path against std.
//!
//! Asserts: an accepted event is within docs/schema.md's bounds (ts not past now + skew,
//! string lengths, cost) and survives the raw record codec (encode, then decode gives
//! the same click); the batch's line counter agrees with its line iterator; `parse_ip`
//! agrees with std's parser on any text.
#![no_main]

use clickgate_core::event::{COST_MICROS_MAX, USER_AGENT_BYTES_MAX, USER_ID_BYTES_MAX};
use clickgate_core::parse::{parse_click, parse_ip};
use clickgate_core::Click;
use clickgate_dataplane::http::{ndjson_count, ndjson_lines};
use clickgate_proto::record::{decode, encode};
use clickgate_proto::Flags;
use libfuzzer_sys::fuzz_target;

const NOW_MS: u64 = 1_764_201_600_000;
const SKEW_MS: u64 = 60_000;

fn check(c: &Click<'_>) {
    assert!(
        c.ts_ms <= NOW_MS + SKEW_MS,
        "ts {} past now + skew",
        c.ts_ms
    );
    assert!(c.user_id.len() <= USER_ID_BYTES_MAX);
    assert!(c.user_agent.len() <= USER_AGENT_BYTES_MAX);
    assert!(c.cost_micros <= COST_MICROS_MAX);
    let mut rec = Vec::new();
    encode(c, Flags(Flags::FRAUD), NOW_MS, &["r1"], &mut rec).expect("a valid click encodes");
    let back = decode(&rec).expect("an encoded record decodes");
    assert_eq!(&back.click, c);
    assert_eq!(
        (back.flags, back.recv_ms, back.rules),
        (Flags(Flags::FRAUD), NOW_MS, vec!["r1"])
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = parse_click(data, NOW_MS, SKEW_MS) {
        check(&c);
    }
    let lines: Vec<(u32, &[u8])> = ndjson_lines(data).collect();
    assert_eq!(ndjson_count(data, usize::MAX), lines.len());
    let mut prev = None;
    for (n, line) in lines {
        assert!(prev.is_none_or(|p| n > p), "line numbers ascend");
        prev = Some(n);
        assert!(!line.ends_with(b"\n"));
        if let Ok(c) = parse_click(line, NOW_MS, SKEW_MS) {
            check(&c);
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        assert_eq!(parse_ip(s), s.parse().ok(), "{s:?}");
    }
});
