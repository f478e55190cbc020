//! The query API's request targets: paths (the route's percent-encoded `{campaign_id}`)
//! and query strings, sent through the real router and auth layer over a small store,
//! and the query-string parsers called directly.
//!
//! Input: a control byte (bit 0: API keys configured; bits 1-2: no key, the admin key,
//! advertiser 7's key, a wrong key), then the request target.
//!
//! Asserts: no answer is a 5xx; a 200 for `/v1/campaigns/{id}/metrics` names exactly the
//! campaign that the target's segment percent-decodes (independently, here) to, and a
//! segment that is not a `u64` never gets a 200; an advertiser's 200s (metrics and top)
//! only show its own campaigns; at most `buckets_max` buckets, ascending, and at most
//! `n <= top_n_max` ads; a parsed metrics query has `from <= to` within `buckets_max`
//! buckets, a parsed top query has `1 <= n <= top_n_max`.
#![no_main]

use std::sync::{Arc, OnceLock, RwLock};

use axum::body::Body;
use axum::extract::Query;
use axum::http::{header, Request, StatusCode, Uri};
use axum::Router;
use clickgate_controlplane::auth::{ApiKeys, AuthConfig};
use clickgate_controlplane::query::{
    parse_metrics_query, parse_top_query, router_over_store, QueryLimits, TIME_MS_MAX,
};
use clickgate_controlplane::store::{Retention, Store};
use clickgate_core::agg::{Counters, Dim, Key};
use clickgate_core::hll::Hll;
use clickgate_core::window::Window;
use clickgate_proto::frames::{
    access_delta, encode_delta, split_frame, CampaignOwner, DeltaEntry, DeltaFrame, FRAMES_VERSION,
    FRAME_BYTES_MAX,
};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const LIMITS: QueryLimits = QueryLimits {
    buckets_max: 50,
    top_n_max: 20,
    top_n_default: 5,
};
const ADMIN_KEY: &str = "admin-key-0123456789";
const ADVERTISER_KEY: &str = "key-of-advertiser-7-0001";
const ADVERTISER: u64 = 7;
/// Campaigns in the store and their advertisers.
const OWNERS: [(u64, u64); 3] = [(123, ADVERTISER), (124, 8), (5, 9)];

struct Env {
    rt: tokio::runtime::Runtime,
    open: Router,
    keyed: Router,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// A store holding a few buckets of the campaigns of `OWNERS`.
fn store() -> Store {
    let now = now_ms();
    let mut entries = Vec::new();
    for (i, &(campaign_id, _)) in OWNERS.iter().enumerate() {
        for back in 0..4u64 {
            for dim in [Dim::All, Dim::Ad(40 + i as u64), Dim::Country(*b"US")] {
                let key = Key {
                    campaign_id,
                    window: Window::M5,
                    bucket_start: Window::M5.bucket_start(now - back * 300_000),
                    dim,
                };
                let c = Counters {
                    clicks: 3 + back,
                    cost_micros: 100,
                    fraud_clicks: 1,
                };
                entries.push(DeltaEntry::from_parts(&key, &c, &Hll::new()));
            }
        }
    }
    let frame = DeltaFrame {
        version: FRAMES_VERSION,
        box_id: 1,
        instance_id: 1,
        core: 0,
        delta_id: 1,
        log_lsn: 0,
        start_lsn: 0,
        entries,
        owners: OWNERS
            .iter()
            .map(|&(campaign_id, advertiser_id)| CampaignOwner {
                campaign_id,
                advertiser_id,
            })
            .collect(),
    };
    let mut buf = Vec::new();
    encode_delta(&frame, &mut buf).expect("encode");
    let (body, _) = split_frame(&buf, FRAME_BYTES_MAX).unwrap().unwrap();
    let mut s = Store::new(Retention::default(), 10_000);
    s.apply_frame(access_delta(&body).expect("valid"), now)
        .expect("apply");
    s
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let store = Arc::new(RwLock::new(store()));
        let keys = ApiKeys::parse_list(
            &format!("{ADMIN_KEY}=admin,{ADVERTISER_KEY}={ADVERTISER}"),
            "fuzz",
        )
        .expect("keys");
        let keyed_auth = AuthConfig {
            keys,
            // Never answer 429: every input is judged on its own.
            failures_per_minute_max: u32::MAX,
            ..AuthConfig::default()
        };
        Env {
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
            open: router_over_store(store.clone(), LIMITS, AuthConfig::default()),
            keyed: router_over_store(store, LIMITS, keyed_auth),
        }
    })
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// `%XX` decoded; any other byte (a `%` not followed by two hex digits too) kept.
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// The campaign id a metrics path names: `Some(None)` for a metrics route whose segment
/// is not a `u64`, `None` for another path.
fn campaign_of(path: &str) -> Option<Option<u64>> {
    let seg = path
        .strip_prefix("/v1/campaigns/")?
        .strip_suffix("/metrics")?;
    if seg.is_empty() || seg.contains('/') {
        return None;
    }
    let decoded = percent_decode(seg.as_bytes());
    Some(
        std::str::from_utf8(&decoded)
            .ok()
            .and_then(|s| s.parse::<u64>().ok()),
    )
}

fn owner(campaign: u64) -> Option<u64> {
    OWNERS.iter().find(|o| o.0 == campaign).map(|o| o.1)
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, target)) = data.split_first() else {
        return;
    };
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };

    // The parsers, called directly.
    if let Ok(Query(params)) = Query::<Vec<(String, String)>>::try_from_uri(&uri) {
        let now = now_ms();
        if let Ok(q) = parse_metrics_query(1, &params, now, &Retention::default(), &LIMITS) {
            assert!(q.from_ms <= q.to_ms && q.to_ms <= TIME_MS_MAX.max(now + 1));
            assert!(q.window.bucket_count(q.from_ms, q.to_ms) <= LIMITS.buckets_max);
        }
        if let Ok(q) = parse_top_query(&params, now, &LIMITS) {
            assert!((1..=LIMITS.top_n_max).contains(&q.n));
            assert_eq!(q.start, q.window.bucket_start(q.start));
        }
    }

    let env = env();
    let keyed = ctl & 1 != 0;
    let key = match (ctl >> 1) & 3 {
        0 => None,
        1 => Some(ADMIN_KEY),
        2 => Some(ADVERTISER_KEY),
        _ => Some("not-a-key-of-this-box-000"),
    };
    let advertiser = (keyed && key == Some(ADVERTISER_KEY)).then_some(ADVERTISER);
    let mut req = Request::get(uri.clone());
    if let Some(k) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let Ok(req) = req.body(Body::empty()) else {
        return;
    };
    let router = if keyed { &env.keyed } else { &env.open };
    let (status, body) = env.rt.block_on(async {
        let resp = router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, body)
    });
    assert!(!status.is_server_error(), "{status} for {uri}");
    if status != StatusCode::OK {
        return;
    }
    let path = uri.path();
    let json = || -> serde_json::Value { serde_json::from_slice(&body).expect("a 200 is JSON") };
    if let Some(named) = campaign_of(path) {
        let v = json();
        let id = named.unwrap_or_else(|| panic!("200 for a campaign id that is not a u64: {uri}"));
        assert_eq!(v["campaign_id"].as_u64(), Some(id), "{uri}");
        if let Some(a) = advertiser {
            assert_eq!(
                owner(id),
                Some(a),
                "advertiser {a} saw campaign {id}: {uri}"
            );
        }
        let buckets = v["buckets"].as_array().expect("buckets");
        assert!(buckets.len() as u64 <= LIMITS.buckets_max);
        let starts: Vec<u64> = buckets
            .iter()
            .map(|b| b["start"].as_u64().unwrap())
            .collect();
        assert!(starts.windows(2).all(|w| w[0] < w[1]), "{starts:?}");
    } else if path == "/v1/top" {
        let v = json();
        let ads = v["ads"].as_array().expect("ads");
        assert!(ads.len() <= LIMITS.top_n_max);
        if let Some(a) = advertiser {
            for ad in ads {
                let c = ad["campaign_id"].as_u64().unwrap();
                assert_eq!(owner(c), Some(a), "advertiser {a} saw campaign {c} in top");
            }
        }
    }
});
