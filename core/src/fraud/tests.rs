use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;
use crate::cidr::mask128;
use crate::{Click, Device, EventId};

const T0: u64 = 1_764_201_600_000; // 2025-11-27T00:00:00Z: a minute boundary, UTC hour 0

fn click<'a>(ip: &str, ua: &'a str, ad_id: u64) -> Click<'a> {
    Click {
        event_id: EventId([7; 16]),
        ts_ms: T0 + 12 * 3_600_000,
        campaign_id: 1,
        ad_id,
        publisher_id: 2,
        advertiser_id: 3,
        user_id: Cow::Borrowed("u-1"),
        ip: ip.parse().expect("ip"),
        user_agent: Cow::Borrowed(ua),
        country: *b"US",
        device: Device::Mobile,
        cost_micros: 500_000,
    }
}

const MOBILE_UA: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)";

fn compile(text: &str) -> CompiledRules {
    RuleSet::parse(text)
        .unwrap_or_else(|e| panic!("{e}"))
        .compile()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn fired<'r>(rules: &'r CompiledRules, d: &Decision) -> Vec<&'r str> {
    d.fired().iter().map(|&r| rules.rule_id(r)).collect()
}

const CONTRACT_FILE: &str = r#"{"rules":[
  {"id":"blocklist","kind":"ip_block","cidrs":["198.51.100.0/24","2001:db8::/32"]},
  {"id":"bots","kind":"user_agent","patterns":["bot","crawler","headlesschrome"]},
  {"id":"honeypots","kind":"honeypot","ad_ids":[999001,999002]},
  {"id":"burst","kind":"ip_rate","max_clicks_per_minute":100},
  {"id":"risk","kind":"risk_model","threshold":0.9,"model":{"bias":-4.0,"weights":{"ua_bot":3.0,"ip_rate":0.05}}}
]}"#;

#[test]
fn the_contract_example_parses_and_round_trips() {
    let set = RuleSet::parse(CONTRACT_FILE).unwrap();
    assert_eq!(set.rules.len(), 5);
    assert_eq!(set.version, 0);
    assert_eq!(
        set.rules[3].spec,
        RuleSpec::IpRate {
            max_clicks_per_minute: 100
        }
    );
    let again = RuleSet::parse(&set.to_json()).unwrap();
    assert_eq!(again, set);
    let versioned = RuleSet {
        version: 42,
        ..set.clone()
    };
    assert_eq!(RuleSet::parse(&versioned.to_json()).unwrap(), versioned);
    // The rule's own key order survives serialisation: id first, then kind.
    assert!(set
        .to_json()
        .contains(r#"{"id":"blocklist","kind":"ip_block","cidrs":"#));
}

#[test]
fn ip_rate_threshold_defaults_to_100() {
    let set = RuleSet::parse(r#"{"rules":[{"id":"r","kind":"ip_rate"}]}"#).unwrap();
    assert_eq!(
        set.rules[0].spec,
        RuleSpec::IpRate {
            max_clicks_per_minute: IP_RATE_DEFAULT_PER_MINUTE
        }
    );
}

/// `(file, expected fragments of the message)`: each bad file is refused whole, and
/// the message names the rule and the problem.
#[test]
fn bad_files_are_refused_with_the_rule_and_problem_named() {
    let cases: &[(&str, &[&str])] = &[
        ("", &["not valid JSON at line 1"]),
        (
            "{\"rules\":[\n{\"id\":\"a\",}\n]}",
            &["not valid JSON at line 2, column"],
        ),
        ("[]", &["must be a JSON object"]),
        ("{}", &["missing \"rules\""]),
        (r#"{"rules":{}}"#, &["\"rules\" must be an array"]),
        (
            r#"{"rules":[],"extra":1}"#,
            &["unknown top-level field \"extra\""],
        ),
        (r#"{"version":-1,"rules":[]}"#, &["\"version\""]),
        (r#"{"rules":[7]}"#, &["rule #0", "must be a JSON object"]),
        (
            r#"{"rules":[{"kind":"ip_rate"}]}"#,
            &["rule #0", "missing \"id\""],
        ),
        (
            r#"{"rules":[{"id":5,"kind":"ip_rate"}]}"#,
            &["rule #0", "\"id\" must be a string"],
        ),
        (
            r#"{"rules":[{"id":"","kind":"ip_rate"}]}"#,
            &["rule #0", "id is empty"],
        ),
        (
            r#"{"rules":[{"id":"a b","kind":"ip_rate"}]}"#,
            &["bad id \"a b\"", "ASCII letters"],
        ),
        (
            r#"{"rules":[{"id":"ok","kind":"ip_rate"},{"id":"x","cidrs":[]}]}"#,
            &["rule \"x\" (#1)", "missing \"kind\""],
        ),
        (
            r#"{"rules":[{"id":"x","kind":"geo_block"}]}"#,
            &["rule \"x\" (#0)", "unknown variant `geo_block`"],
        ),
        (
            r#"{"rules":[{"id":"bl","kind":"ip_block","cidrs":["10.0.0.0/33"]}]}"#,
            &[
                "rule \"bl\"",
                "bad CIDR \"10.0.0.0/33\"",
                "prefix length 33 exceeds 32",
            ],
        ),
        (
            r#"{"rules":[{"id":"bl","kind":"ip_block","cidr":["10.0.0.0/8"]}]}"#,
            &["rule \"bl\"", "unknown field `cidr`"],
        ),
        (
            r#"{"rules":[{"id":"bl","kind":"ip_block","cidrs":[]}]}"#,
            &["rule \"bl\"", "\"cidrs\" is empty"],
        ),
        (
            r#"{"rules":[{"id":"bl","kind":"ip_block","cidrs":"10.0.0.0/8"}]}"#,
            &["rule \"bl\"", "invalid type"],
        ),
        (
            r#"{"rules":[{"id":"ua","kind":"user_agent","patterns":["bot",""]}]}"#,
            &["rule \"ua\"", "empty pattern"],
        ),
        (
            r#"{"rules":[{"id":"hp","kind":"honeypot","ad_ids":[-1]}]}"#,
            &["rule \"hp\"", "invalid value"],
        ),
        (
            r#"{"rules":[{"id":"r","kind":"ip_rate","max_clicks_per_minute":0}]}"#,
            &["rule \"r\"", "at least 1"],
        ),
        (
            r#"{"rules":[{"id":"m","kind":"risk_model","threshold":1.5,"model":{"weights":{"ua_bot":1}}}]}"#,
            &["rule \"m\"", "threshold must be in (0, 1]"],
        ),
        (
            r#"{"rules":[{"id":"m","kind":"risk_model","threshold":0.5,"model":{"weights":{"moon_phase":1}}}]}"#,
            &[
                "rule \"m\"",
                "unknown model feature \"moon_phase\"",
                "ua_bot",
            ],
        ),
        (
            r#"{"rules":[{"id":"m","kind":"risk_model","threshold":0.5,"model":{"weights":{}}}]}"#,
            &["rule \"m\"", "weights is empty"],
        ),
        (
            r#"{"rules":[{"id":"m","kind":"risk_model","threshold":0.5}]}"#,
            &["rule \"m\"", "missing field `model`"],
        ),
        (
            r#"{"rules":[{"id":"m","kind":"risk_model","threshold":0.5,"model":{"weights":{"ua_bot":1},"geo":{"usa":["1.2.3.0/24"]}}}]}"#,
            &["rule \"m\"", "\"usa\" is not a two-letter"],
        ),
        (
            r#"{"rules":[{"id":"d","kind":"ip_rate"},{"id":"d","kind":"honeypot","ad_ids":[1]}]}"#,
            &["rule \"d\" (#1)", "duplicate id"],
        ),
    ];
    for (text, want) in cases {
        let e = RuleSet::parse(text).expect_err(text).to_string();
        for w in *want {
            assert!(e.contains(w), "{text}\n  error: {e}\n  missing: {w}");
        }
    }
}

#[test]
fn rule_errors_carry_the_rule_id() {
    let e =
        RuleSet::parse(r#"{"rules":[{"id":"bl","kind":"ip_block","cidrs":["x"]}]}"#).unwrap_err();
    assert_eq!(e.rule_id(), Some("bl"));
    let syntax = RuleSet::parse("{\n  \"rules\": [\n    {\"id\": }\n]}").unwrap_err();
    match syntax {
        RuleError::Syntax { line, column, .. } => assert_eq!((line, column), (3, 12)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn ip_block_edges_v4_and_v6() {
    let rules = compile(CONTRACT_FILE);
    let cases = [
        ("198.51.100.0", true),
        ("198.51.100.255", true),
        ("198.51.99.255", false),
        ("198.51.101.0", false),
        ("::ffff:198.51.100.7", true),
        ("2001:db8::", true),
        ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", true),
        ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", false),
        ("2001:db9::", false),
        ("203.0.113.7", false),
    ];
    for (ip, want) in cases {
        let d = rules.evaluate(&click(ip, MOBILE_UA, 1), 1);
        assert_eq!(d.fraud(), want, "{ip}");
        if want {
            assert_eq!(fired(&rules, &d), vec!["blocklist"], "{ip}");
        }
    }
}

#[test]
fn user_agent_patterns_are_case_insensitive_substrings() {
    let rules = compile(CONTRACT_FILE);
    for (ua, want) in [
        ("Googlebot/2.1", true),
        ("GOOGLEBOT", true),
        ("Mozilla/5.0 HeadlessChrome/120", true),
        ("some CrAwLeR thing", true),
        ("Mozilla/5.0 (iPhone)", false),
        ("", false),
        ("bo t", false),
    ] {
        let d = rules.evaluate(&click("203.0.113.7", ua, 1), 1);
        // The risk model also reads ua_bot: "bot" UAs fire it only with a high rate.
        assert_eq!(fired(&rules, &d).contains(&"bots"), want, "{ua}");
    }
}

#[test]
fn several_user_agent_rules_each_fire() {
    let rules = compile(
        r#"{"rules":[
        {"id":"a","kind":"user_agent","patterns":["foo"]},
        {"id":"b","kind":"user_agent","patterns":["bar","oob"]},
        {"id":"c","kind":"user_agent","patterns":["zzz"]}]}"#,
    );
    let d = rules.evaluate(&click("1.2.3.4", "xFOOBARx", 1), 1);
    assert_eq!(fired(&rules, &d), vec!["a", "b"]);
    let d = rules.evaluate(&click("1.2.3.4", "foobar foo", 1), 1);
    assert_eq!(fired(&rules, &d), vec!["a", "b"], "each rule listed once");
}

#[test]
fn honeypot_ads() {
    let rules = compile(CONTRACT_FILE);
    for (ad, want) in [
        (999_001, true),
        (999_002, true),
        (999_003, false),
        (678, false),
    ] {
        let d = rules.evaluate(&click("203.0.113.7", MOBILE_UA, ad), 1);
        assert_eq!(fired(&rules, &d) == vec!["honeypots"], want, "{ad}");
    }
}

#[test]
fn the_101st_click_of_a_minute_is_fraud_and_the_100th_is_not() {
    let rules = compile(r#"{"rules":[{"id":"burst","kind":"ip_rate"}]}"#);
    assert!(rules.needs_ip_rate());
    let rate = IpRate::new(1024);
    let c = click("203.0.113.7", MOBILE_UA, 1);
    for i in 1..=100u32 {
        let n = rate.hit(c.ip, T0 + 59_000);
        assert_eq!(n, i);
        assert!(!rules.evaluate(&c, n).fraud(), "click {i}");
    }
    let n = rate.hit(c.ip, T0 + 59_999);
    assert_eq!(n, 101);
    let d = rules.evaluate(&c, n);
    assert_eq!(fired(&rules, &d), vec!["burst"]);
    // A new minute starts from one; other IPs have their own count.
    assert_eq!(rate.hit(c.ip, T0 + 60_000), 1);
    assert_eq!(rate.hit("203.0.113.8".parse().unwrap(), T0), 1);
    // A late click of the previous minute still counts there.
    assert_eq!(rate.hit(c.ip, T0 + 1), 102);
    // Far older than that: counted as the first of its minute.
    assert_eq!(rate.hit(c.ip, T0 - 120_000), 1);
    // IPv4 and its mapped form are the same address.
    assert_eq!(rate.hit("::ffff:203.0.113.8".parse().unwrap(), T0), 2);
    // evaluate_static never applies the rate rule (billing applies §6 itself).
    assert!(!rules.evaluate_static(&c, 1000).fraud());
    assert_eq!(rules.ip_rate_rules(), &[(0, 100)]);
}

#[test]
fn ip_rate_table_is_bounded_and_evicts_the_idle() {
    let rate = IpRate::new(64);
    assert_eq!(rate.capacity(), 64);
    let hot: IpAddr = "10.0.0.1".parse().unwrap();
    for i in 0..10_000u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i));
        rate.hit(ip, T0);
        // The hot address is hit between newcomers: never the least recently seen.
        assert_eq!(rate.hit(hot, T0), i + 1);
        assert!(rate.tracked() <= rate.capacity());
    }
    assert_eq!(rate.tracked(), 64);
    assert!(rate.evictions() >= 10_000 - 64);
    // Tiny tables still work.
    let one = IpRate::new(0);
    assert_eq!(one.capacity(), 1);
    assert_eq!(one.hit(hot, T0), 1);
    assert_eq!(one.hit(hot, T0), 2);
    assert_eq!(one.hit("10.0.0.2".parse().unwrap(), T0), 1);
    assert_eq!(one.hit(hot, T0), 1, "evicted: starts again");
}

#[test]
fn risk_model_scores_and_threshold() {
    let rules = compile(CONTRACT_FILE);
    let risk = rules.rule_ids().iter().position(|i| i == "risk").unwrap() as u16;
    let human = click("203.0.113.7", MOBILE_UA, 1);
    let bot = click("203.0.113.7", "python-requests/2.31", 1);
    // bias -4: a human with one click scores σ(-4 + 0.05) ≈ 0.019.
    let s = rules.model_score(risk, &human, 1).unwrap();
    assert!(
        (s - 1.0 / (1.0 + (4.0f64 - 0.05).exp())).abs() < 1e-12,
        "{s}"
    );
    assert!(!rules.evaluate(&human, 1).fraud());
    // A bot UA: σ(-4 + 3 + 0.05·n) ≥ 0.9 ⇔ n ≥ (ln 9 + 1) / 0.05 ≈ 63.94.
    let s63 = rules.model_score(risk, &bot, 63).unwrap();
    let s64 = rules.model_score(risk, &bot, 64).unwrap();
    assert!(s63 < 0.9 && s64 >= 0.9, "{s63} {s64}");
    assert!(!rules.evaluate(&bot, 63).fraud());
    assert_eq!(fired(&rules, &rules.evaluate(&bot, 64)), vec!["risk"]);
}

#[test]
fn model_features() {
    let text = |w: &str| {
        format!(
            r#"{{"rules":[{{"id":"m","kind":"risk_model","threshold":0.5,"model":{{"bias":-0.5,"weights":{{"{w}":1.0}},"geo":{{"DE":["203.0.113.0/24"]}}}}}}]}}"#
        )
    };
    let night = T0 + 3 * 3_600_000;
    let cases: Vec<(&str, Click<'_>, bool)> = vec![
        (
            "ua_bot",
            click("1.1.1.1", "Mozilla HeadlessChrome", 1),
            true,
        ),
        ("ua_bot", click("1.1.1.1", MOBILE_UA, 1), false),
        ("ua_empty", click("1.1.1.1", "", 1), true),
        ("ua_empty", click("1.1.1.1", MOBILE_UA, 1), false),
        ("ua_short", click("1.1.1.1", "curl", 1), true),
        ("ua_short", click("1.1.1.1", MOBILE_UA, 1), false),
        (
            "ua_device_mismatch",
            click("1.1.1.1", "Mozilla (Windows NT 10.0)", 1),
            true,
        ),
        ("ua_device_mismatch", click("1.1.1.1", MOBILE_UA, 1), false),
        ("ip_v6", click("2001:db8::1", MOBILE_UA, 1), true),
        ("ip_v6", click("::ffff:1.1.1.1", MOBILE_UA, 1), false),
        (
            "hour_night",
            Click {
                ts_ms: night,
                ..click("1.1.1.1", MOBILE_UA, 1)
            },
            true,
        ),
        ("hour_night", click("1.1.1.1", MOBILE_UA, 1), false),
        ("country_mismatch", click("203.0.113.9", MOBILE_UA, 1), true),
        (
            "country_mismatch",
            Click {
                country: *b"DE",
                ..click("203.0.113.9", MOBILE_UA, 1)
            },
            false,
        ),
        (
            "country_mismatch",
            click("198.51.100.1", MOBILE_UA, 1),
            false,
        ),
        (
            "device_ctv",
            Click {
                device: Device::Ctv,
                ..click("1.1.1.1", MOBILE_UA, 1)
            },
            true,
        ),
        (
            "device_other",
            Click {
                device: Device::Other,
                ..click("1.1.1.1", MOBILE_UA, 1)
            },
            true,
        ),
        (
            "cost_units",
            Click {
                cost_micros: 1_000_000,
                ..click("1.1.1.1", MOBILE_UA, 1)
            },
            true,
        ),
        (
            "cost_units",
            Click {
                cost_micros: 100_000,
                ..click("1.1.1.1", MOBILE_UA, 1)
            },
            false,
        ),
    ];
    for (feature, c, want) in cases {
        let rules = compile(&text(feature));
        assert_eq!(rules.evaluate(&c, 1).fraud(), want, "{feature} {c:?}");
    }
    // Every feature is documented by name and parses back.
    for f in Feature::ALL {
        assert_eq!(Feature::parse(f.name()), Some(f));
    }
}

#[test]
fn threshold_one_needs_a_certain_score() {
    let rules = compile(
        r#"{"rules":[{"id":"m","kind":"risk_model","threshold":1,"model":{"bias":0,"weights":{"ip_rate":1}}}]}"#,
    );
    let c = click("1.1.1.1", MOBILE_UA, 1);
    assert!(!rules.evaluate(&c, 5).fraud());
    assert!(rules.evaluate(&c, 100).fraud());
}

#[test]
fn fired_rules_are_in_file_order_and_bounded() {
    let mut rules = String::from(r#"{"rules":["#);
    for i in 0..20 {
        if i > 0 {
            rules.push(',');
        }
        rules.push_str(&format!(
            r#"{{"id":"r{i:02}","kind":"user_agent","patterns":["x{i:02}","y"]}}"#
        ));
    }
    rules.push_str("]}");
    let rules = compile(&rules);
    let d = rules.evaluate(&click("1.1.1.1", "x19 x03 y", 1), 1);
    assert!(d.fraud());
    let ids = fired(&rules, &d);
    assert_eq!(ids.len(), FIRED_MAX);
    assert_eq!(ids[0], "r00");
    assert_eq!(ids[15], "r15");
    assert!(d.truncated());
    // Record-space bound: the 16 longest ids plus their length bytes.
    assert_eq!(rules.fired_bytes_max(), 16 * 4);
}

#[test]
fn decision_fire_keeps_sorted_unique_smallest() {
    let mut d = Decision::default();
    for r in [5u16, 3, 9, 3, 1, 5] {
        d.fire(r);
    }
    assert_eq!(d.fired(), &[1, 3, 5, 9]);
    assert!(!d.truncated());
    let mut d = Decision::default();
    for r in (0..40u16).rev() {
        d.fire(r);
    }
    assert_eq!(d.fired(), &(0..16).collect::<Vec<u16>>()[..]);
}

#[test]
fn add_and_delete_by_id() {
    let set = RuleSet::parse(CONTRACT_FILE).unwrap();
    let rule =
        RuleSet::parse_rule(r#"{"id":"bots","kind":"user_agent","patterns":["spider"]}"#).unwrap();
    let replaced = set.with_rule(rule).unwrap();
    assert_eq!(replaced.rules.len(), 5);
    assert_eq!(
        replaced.rules[1].spec,
        RuleSpec::UserAgent {
            patterns: vec!["spider".into()]
        }
    );
    let added = set
        .with_rule(RuleSet::parse_rule(r#"{"id":"new","kind":"honeypot","ad_ids":[1]}"#).unwrap())
        .unwrap();
    assert_eq!(added.rules.len(), 6);
    let removed = set.without_rule("burst").unwrap();
    assert_eq!(removed.rules.len(), 4);
    assert!(set.without_rule("nope").is_none());
    assert!(RuleSet::parse_rule(r#"{"id":"x","kind":"honeypot","ad_ids":[]}"#).is_err());
}

#[test]
fn empty_set_flags_nothing() {
    let rules = CompiledRules::empty();
    assert!(rules.is_empty());
    assert!(!rules.needs_ip_rate());
    assert_eq!(rules.fired_bytes_max(), 0);
    assert!(!rules
        .evaluate(&click("1.1.1.1", "bot", 999_001), 1000)
        .fraud());
}

// --- the IP matcher against a naive reference -----------------------------------------

const MAPPED: u128 = 0xffff_0000_0000;

fn canonical_ref(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => MAPPED | u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn naive_contains(entries: &[(IpAddr, u8)], a: IpAddr) -> bool {
    let a = canonical_ref(a);
    entries.iter().any(|&(net, p)| {
        let p = if net.is_ipv4() { p + 96 } else { p };
        canonical_ref(net) & mask128(p) == a & mask128(p)
    })
}

fn arb_addr() -> impl Strategy<Value = IpAddr> {
    // Clustered around a few bases so that prefixes actually hit.
    let v4 = (0usize..3, any::<u32>(), 0u32..32).prop_map(|(b, noise, bits)| {
        let base = [0x0a00_0000u32, 0xc633_6400, 0xffff_ffff][b];
        IpAddr::V4(Ipv4Addr::from(base ^ (noise >> bits)))
    });
    let v6 = (0usize..4, any::<u128>(), 0u32..128).prop_map(|(b, noise, bits)| {
        let base = [0x2001_0db8u128 << 96, MAPPED | 0x0a00_0000, 0, u128::MAX][b];
        IpAddr::V6(Ipv6Addr::from(base ^ (noise >> bits)))
    });
    prop_oneof![v4, v6]
}

fn arb_entry() -> impl Strategy<Value = (IpAddr, u8)> {
    // Mostly long prefixes (as blocklists are), some short ones.
    (arb_addr(), prop_oneof![3 => 16u8..=128, 1 => 0u8..16])
        .prop_map(|(a, p)| (a, if a.is_ipv4() { p % 33 } else { p }))
}

proptest! {
    #[test]
    fn blocklist_matches_the_naive_reference(
        entries in proptest::collection::vec(arb_entry(), 0..40),
        probes in proptest::collection::vec(arb_addr(), 1..64),
    ) {
        let items: Vec<String> = entries.iter().map(|(a, p)| format!("{a}/{p}")).collect();
        let bl = IpBlocklist::parse_list(&items).expect("generated entries are valid");
        for a in probes.iter().copied().chain(entries.iter().map(|e| e.0)) {
            prop_assert_eq!(bl.contains(a), naive_contains(&entries, a), "{:?} {}", items, a);
        }
    }

    #[test]
    fn parse_never_panics(text in "[\\[\\]{}\":,a-z0-9_. /-]{0,120}") {
        let _ = RuleSet::parse(&text);
    }
}

#[test]
fn blocklist_with_many_networks() {
    let mut items = Vec::new();
    for i in 0..10_000u32 {
        items.push(format!("{}/{}", Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24));
    }
    items.push("2001:db8::/48".into());
    let bl = IpBlocklist::parse_list(&items).unwrap();
    assert_eq!(bl.len(), 10_001);
    assert!(bl.contains("10.0.0.0".parse().unwrap()));
    assert!(bl.contains("10.39.15.255".parse().unwrap()));
    assert!(!bl.contains("10.39.16.0".parse().unwrap()));
    assert!(bl.contains("2001:db8:0:ffff::1".parse().unwrap()));
    assert!(!bl.contains("2001:db8:1::".parse().unwrap()));
}

#[test]
fn ip_rate_counts_for_the_box_across_threads() {
    let rate = IpRate::new(1024);
    let ip: IpAddr = "203.0.113.50".parse().unwrap();
    let max = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(|| {
                for _ in 0..1_000 {
                    max.fetch_max(rate.hit(ip, T0), std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(max.into_inner(), 4_000);
    // The figure the settings document: 40 bytes per address.
    assert_eq!(rate.memory_bytes(), rate.capacity() * 40);
    assert_eq!(rate.hit(ip, T0), 4_001);
}

#[test]
fn the_user_agent_cache_gives_the_scans_answer_and_follows_the_rules() {
    let a = compile(CONTRACT_FILE);
    let b = compile(
        r#"{"rules":[{"id":"other","kind":"user_agent","patterns":["iphone"]},
            {"id":"risk","kind":"risk_model","threshold":0.5,"model":{"bias":-1.0,"weights":{"ua_device_mismatch":3.0}}}]}"#,
    );
    let long = format!("Mozilla/5.0 {}bot", "x".repeat(UA_CACHED_BYTES_MAX));
    // Far more distinct user agents than slots (collisions), each seen several times,
    // some long enough to bypass the cache, under two rule sets in turn.
    let mut uas: Vec<String> = (0..3 * UA_CACHE_SLOTS)
        .map(|i| match i % 5 {
            0 => format!("Mozilla/5.0 (iPhone) crawler {i}"),
            1 => format!("Mozilla/5.0 (Windows NT 10.0) Chrome/{i}"),
            2 => format!("HeadlessChrome/{i} (Android)"),
            3 => format!("curl/{i}"),
            _ => format!("{MOBILE_UA} {i}"),
        })
        .collect();
    uas.push(long);
    uas.push(String::new());
    let mut cache = UaCache::new();
    for round in 0..4 {
        let rules = if round % 2 == 0 { &a } else { &b };
        for ua in uas.iter().chain(uas.iter().rev()) {
            let c = click("203.0.113.9", ua, 5);
            for n in [1, 150] {
                assert_eq!(
                    rules.evaluate_cached(&c, n, &mut cache),
                    rules.evaluate(&c, n),
                    "{ua:?} under set {}",
                    round % 2
                );
            }
        }
    }
    assert!(cache.hits > 0 && cache.misses > 0);
}
