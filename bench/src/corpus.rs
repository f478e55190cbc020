//! A fixed corpus of valid event lines for the per-core pipeline benches and the
//! allocation test: Zipf-ish campaigns, mixed countries and devices, ids patched in place
//! per round so a bloom shard sees new events every round, as in live traffic.

/// The time the corpus's events are dated around (ms since epoch).
pub const NOW_MS: u64 = 1_764_201_600_000;

/// Event lines back to back (newline separated) and where each one is.
pub struct Lines {
    pub buf: Vec<u8>,
    /// (start, end, id offset) of each line.
    pub spans: Vec<(usize, usize, usize)>,
}

/// `n` valid lines, the same on every call.
pub fn lines(n: usize) -> Lines {
    let countries = ["US", "DE", "FR", "JP", "BR", "IN"];
    let devices = ["mobile", "desktop", "tablet", "ctv", "other"];
    let mut buf = Vec::new();
    let mut spans = Vec::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Zipf-ish: low campaign ids far more often.
        let campaign = 1 + (x % 1000) * (x % 1000) / 1000;
        let start = buf.len();
        let line = format!(
            r#"{{"event_id":"00000000-8a3b-4c1d-9e2f-{i:012x}","ts":{ts},"campaign_id":{campaign},"ad_id":{ad},"publisher_id":{publisher},"advertiser_id":{adv},"user_id":"u-{user}","ip":"10.{a}.{b}.{c}","user_agent":"Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)","country":"{country}","device":"{device}","cost_micros":{cost}}}"#,
            ts = NOW_MS - (x % 300_000),
            ad = campaign * 100 + x % 10,
            publisher = 1 + (x >> 8) % 100,
            adv = 1 + campaign % 50,
            user = (x >> 16) % 100_000,
            a = (x >> 24) as u8,
            b = (x >> 32) as u8,
            c = (x >> 40) as u8,
            country = countries[(x >> 48) as usize % countries.len()],
            device = devices[(x >> 52) as usize % devices.len()],
            cost = 1 + (x >> 20) % 1_000_000,
        );
        let id_at = start + line.find("00000000-").expect("id");
        buf.extend_from_slice(line.as_bytes());
        spans.push((start, buf.len(), id_at));
        buf.push(b'\n');
    }
    Lines { buf, spans }
}

/// Gives every line a new event id for round `generation` (8 hex digits patched in place).
pub fn set_generation(lines: &mut Lines, generation: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &(_, _, at) in &lines.spans {
        for k in 0..8 {
            lines.buf[at + k] = HEX[((generation >> (28 - 4 * k)) & 0xf) as usize];
        }
    }
}

/// A rule set of every kind (docs/api.md), as operators push it.
pub const RULES_JSON: &str = r#"{"rules":[
  {"id":"blocklist","kind":"ip_block","cidrs":["198.51.100.0/24","2001:db8::/32","10.200.0.0/16"]},
  {"id":"bots","kind":"user_agent","patterns":["bot","crawler","headlesschrome"]},
  {"id":"honeypots","kind":"honeypot","ad_ids":[999001,999002]},
  {"id":"burst","kind":"ip_rate","max_clicks_per_minute":100},
  {"id":"risk","kind":"risk_model","threshold":0.9,"model":{"bias":-4.0,
     "weights":{"ua_bot":3.0,"ip_rate":0.05,"hour_night":0.5,"ua_device_mismatch":1.0}}}
]}"#;
