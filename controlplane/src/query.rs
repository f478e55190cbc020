//! The query API of docs/api.md: request parsing and validation (pure, table-tested) and
//! the axum routes that read the store.
//!
//! - `GET /v1/campaigns/{campaign_id}/metrics?window=5m|1h|1d&from=T&to=T[&filter]`:
//!   buckets whose **start** lies in `[from, to)`, ascending, empty ones omitted. `T` is
//!   ms since the epoch or RFC 3339 (`2025-11-27T00:00:00Z`, `…+02:00`, fractions of a
//!   second allowed). Defaults: `to` = now + 1 ms (the current bucket is included),
//!   `from` = `to` − the window's retention (24 h of 5m buckets, 7 d of 1h, 90 d of 1d by
//!   default). At most `query_buckets_max` buckets per request. At most one filter
//!   (`country`, `device`, `ad_id`, `publisher_id`): the store keeps single-dimension keys.
//! - `GET /v1/top?window=..&n=N[&at=T]`: the `n` (default 10, at most `top_n_max`) ads
//!   with most billable clicks in the bucket containing `at` (default now); ties go to the
//!   lower campaign id, then the lower ad id.
//! - Errors: 400 `{"error":"...","field":"..."}`; unknown routes 404 `{"error":"not found"}`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clickgate_core::agg::Dim;
use clickgate_core::window::Window;
use clickgate_core::Device;

use crate::auth::{AdminCaller, Caller, VisibleCampaign};
use crate::metrics::Metrics;
use crate::read::CounterRead;
use crate::store::{BucketOut, Retention, Store, TopAd};

/// Latest time accepted: 9999-12-31T23:59:59.999Z.
pub const TIME_MS_MAX: u64 = 253_402_300_799_999;

#[derive(Clone, Copy, Debug)]
pub struct QueryLimits {
    pub buckets_max: u64,
    pub top_n_max: usize,
    pub top_n_default: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            buckets_max: 10_000,
            top_n_max: 1_000,
            top_n_default: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ApiError {
    pub error: String,
    pub field: Option<&'static str>,
}

fn bad(field: &'static str, error: impl Into<String>) -> ApiError {
    ApiError {
        error: error.into(),
        field: Some(field),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsQuery {
    pub campaign_id: u64,
    pub window: Window,
    pub dim: Dim,
    pub from_ms: u64,
    pub to_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopQuery {
    pub window: Window,
    pub start: u64,
    pub n: usize,
}

/// Parses `T`: an integer of ms since the epoch, or RFC 3339.
pub fn parse_time(s: &str) -> Option<u64> {
    let v = if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
        s.parse::<u64>().ok()?
    } else {
        clickgate_core::civil::parse_rfc3339_ms(s)?
    };
    (v <= TIME_MS_MAX).then_some(v)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn parse_window(params: &[(String, String)]) -> Result<Window, ApiError> {
    match param(params, "window") {
        None => Err(bad("window", "missing window: expected 5m, 1h or 1d")),
        Some(w) => Window::parse(w)
            .ok_or_else(|| bad("window", format!("bad window {w:?}: expected 5m, 1h or 1d"))),
    }
}

fn parse_id(field: &'static str, v: &str) -> Result<u64, ApiError> {
    v.parse::<u64>().map_err(|_| {
        bad(
            field,
            format!("bad {field} {v:?}: expected an unsigned 64-bit integer"),
        )
    })
}

fn parse_t(field: &'static str, v: &str) -> Result<u64, ApiError> {
    parse_time(v).ok_or_else(|| {
        bad(
            field,
            format!("bad {field} {v:?}: expected ms since the epoch or RFC 3339"),
        )
    })
}

/// A campaign id from a route's decoded `{campaign_id}`: the one parser both the tenant
/// check and the handlers use.
pub fn parse_campaign_id(v: &str) -> Result<u64, ApiError> {
    parse_id("campaign_id", v)
}

pub fn parse_metrics_query(
    campaign_id: u64,
    params: &[(String, String)],
    now_ms: u64,
    retention: &Retention,
    limits: &QueryLimits,
) -> Result<MetricsQuery, ApiError> {
    let window = parse_window(params)?;
    let mut dim = Dim::All;
    let mut seen: Option<&'static str> = None;
    for (field, v) in params {
        let d = match field.as_str() {
            "country" => {
                let b = v.as_bytes();
                if b.len() != 2 || !b.iter().all(u8::is_ascii_uppercase) {
                    return Err(bad(
                        "country",
                        format!("bad country {v:?}: expected two uppercase letters"),
                    ));
                }
                Dim::Country([b[0], b[1]])
            }
            "device" => Dim::Device(Device::parse(v).ok_or_else(|| {
                bad(
                    "device",
                    format!("bad device {v:?}: expected mobile, desktop, tablet, ctv or other"),
                )
            })?),
            "ad_id" => Dim::Ad(parse_id("ad_id", v)?),
            "publisher_id" => Dim::Publisher(parse_id("publisher_id", v)?),
            _ => continue,
        };
        let name = match d {
            Dim::Country(_) => "country",
            Dim::Device(_) => "device",
            Dim::Ad(_) => "ad_id",
            _ => "publisher_id",
        };
        if seen.is_some_and(|s| s != name) || (seen == Some(name) && dim != d) {
            return Err(bad(
                name,
                "at most one of country, device, ad_id, publisher_id",
            ));
        }
        seen = Some(name);
        dim = d;
    }
    let to_ms = match param(params, "to") {
        Some(v) => parse_t("to", v)?,
        None => now_ms.saturating_add(1),
    };
    let from_ms = match param(params, "from") {
        Some(v) => parse_t("from", v)?,
        None => to_ms.saturating_sub(retention.of(window)),
    };
    if from_ms > to_ms {
        return Err(bad("from", "from is after to"));
    }
    let n = window.bucket_count(from_ms, to_ms);
    if n > limits.buckets_max {
        return Err(bad(
            "to",
            format!(
                "range too long: {n} buckets of {window}, at most {}",
                limits.buckets_max
            ),
        ));
    }
    Ok(MetricsQuery {
        campaign_id,
        window,
        dim,
        from_ms,
        to_ms,
    })
}

pub fn parse_top_query(
    params: &[(String, String)],
    now_ms: u64,
    limits: &QueryLimits,
) -> Result<TopQuery, ApiError> {
    let window = parse_window(params)?;
    let n = match param(params, "n") {
        None => limits.top_n_default,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=limits.top_n_max).contains(&n) => n,
            _ => {
                return Err(bad(
                    "n",
                    format!("bad n {v:?}: expected 1..={}", limits.top_n_max),
                ))
            }
        },
    };
    let at = match param(params, "at") {
        Some(v) => parse_t("at", v)?,
        None => now_ms,
    };
    Ok(TopQuery {
        window,
        start: window.bucket_start(at),
        n,
    })
}

#[derive(Clone)]
pub(crate) struct ApiState {
    pub store: Arc<RwLock<Store>>,
    pub metrics: Arc<Metrics>,
    pub limits: QueryLimits,
    /// Where every counter read goes: the embedded store, or Redis when `redis_url` is set.
    pub reader: Arc<dyn CounterRead>,
    /// Set when `redis_url` is (its health and metrics).
    pub redis: Option<Arc<crate::redis_store::RedisSide>>,
}

/// 503 when the backend behind [`CounterRead`] did not answer.
pub(crate) fn backend_unavailable(e: anyhow::Error) -> Response {
    tracing::warn!(error = %format!("{e:#}"), "query: the counter store did not answer");
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &ApiError {
            error: format!("redis unavailable: {e}"),
            field: None,
        },
    )
}

fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    (status, Json(body)).into_response()
}

fn error_response(status: StatusCode, e: &ApiError) -> Response {
    json_response(status, e)
}

fn query_rejection(r: QueryRejection) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        &ApiError {
            error: format!("bad query string: {r}"),
            field: None,
        },
    )
}

#[derive(serde::Serialize)]
struct MetricsBody<'a> {
    campaign_id: u64,
    window: &'static str,
    buckets: &'a [BucketOut],
}

#[derive(serde::Serialize)]
struct TopBody<'a> {
    window: &'static str,
    start: u64,
    ads: &'a [TopAd],
}

async fn campaign_metrics(
    State(st): State<ApiState>,
    campaign: VisibleCampaign,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    st.metrics.inc(&st.metrics.queries_metrics);
    let Query(params) = match q {
        Ok(q) => q,
        Err(r) => return query_rejection(r),
    };
    let now = crate::now_ms();
    let retention = st
        .store
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .retention();
    let q = match parse_metrics_query(campaign.id, &params, now, &retention, &st.limits) {
        Ok(q) => q,
        Err(e) => {
            st.metrics.inc(&st.metrics.queries_bad);
            return error_response(StatusCode::BAD_REQUEST, &e);
        }
    };
    let buckets = match st
        .reader
        .series(q.campaign_id, q.window, q.dim, q.from_ms, q.to_ms)
        .await
    {
        Ok(b) => b,
        Err(e) => return backend_unavailable(e),
    };
    json_response(
        StatusCode::OK,
        &MetricsBody {
            campaign_id: q.campaign_id,
            window: q.window.as_str(),
            buckets: &buckets,
        },
    )
}

async fn top(
    State(st): State<ApiState>,
    Caller(caller): Caller,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    st.metrics.inc(&st.metrics.queries_top);
    let Query(params) = match q {
        Ok(q) => q,
        Err(r) => return query_rejection(r),
    };
    let q = match parse_top_query(&params, crate::now_ms(), &st.limits) {
        Ok(q) => q,
        Err(e) => {
            st.metrics.inc(&st.metrics.queries_bad);
            return error_response(StatusCode::BAD_REQUEST, &e);
        }
    };
    let ads = match st
        .reader
        .top(q.window, q.start, q.n, caller.advertiser())
        .await
    {
        Ok(a) => a,
        Err(e) => return backend_unavailable(e),
    };
    json_response(
        StatusCode::OK,
        &TopBody {
            window: q.window.as_str(),
            start: q.start,
            ads: &ads,
        },
    )
}

async fn metrics(State(st): State<ApiState>, _: AdminCaller) -> Response {
    let store = st.store.read().unwrap_or_else(|e| e.into_inner());
    let mut text = st.metrics.render(&store);
    drop(store);
    if let Some(r) = &st.redis {
        crate::redis_store::render_metrics(&r.stats, &r.outbox, &mut text);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn healthz(State(st): State<ApiState>) -> Response {
    if st.metrics.writer_failed() {
        let e = HashMap::from([("error", "store writer failed; see logs")]);
        return json_response(StatusCode::SERVICE_UNAVAILABLE, &e);
    }
    json_response(StatusCode::OK, &HashMap::from([("status", "ok")]))
}

/// 200 when the store writer works and Redis (if configured) answers or what it has not
/// taken yet fits the outbox; the body says which (docs/api.md's `/readyz`).
async fn readyz(State(st): State<ApiState>) -> Response {
    let mut body = serde_json::json!({"status": "ready"});
    let mut ready = !st.metrics.writer_failed() && !st.metrics.writer_stalled();
    if st.metrics.writer_failed() {
        body["error"] = "store writer failed; see logs".into();
    } else if st.metrics.writer_stalled() {
        body["error"] = "store WAL not writable (disk full?); retrying".into();
    }
    if let Some(r) = &st.redis {
        ready &= r.ready();
        if let (Some(b), serde_json::Value::Object(m)) = (body.as_object_mut(), r.status()) {
            b.extend(m);
        }
    }
    if !ready {
        body["status"] = "not ready".into();
        return json_response(StatusCode::SERVICE_UNAVAILABLE, &body);
    }
    json_response(StatusCode::OK, &body)
}

/// Unknown routes: 404 to a caller with a valid key (or on an API without keys), 401
/// without one, so the routes' names are not probed anonymously.
async fn not_found(_: Caller) -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &HashMap::from([("error", "not found")]),
    )
}

pub(crate) fn router(st: ApiState) -> Router {
    Router::new()
        .route("/v1/campaigns/{campaign_id}/metrics", get(campaign_metrics))
        .route("/v1/top", get(top))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(st)
}

/// The query API's routes behind the auth layer, over an embedded store and without a
/// socket or the dashboard: what `Controlplane::start` serves, for the fuzz target that
/// drives raw request targets (paths, percent-encoded ids, query strings) through it.
#[doc(hidden)]
pub fn router_over_store(
    store: Arc<RwLock<Store>>,
    limits: QueryLimits,
    auth: crate::auth::AuthConfig,
) -> Router {
    let metrics = Arc::new(Metrics::default());
    let reader: Arc<dyn CounterRead> = Arc::new(crate::read::EmbeddedRead::new(store.clone()));
    let tenants = Arc::new(crate::auth::Auth::new(
        auth,
        reader.clone(),
        metrics.clone(),
    ));
    router(ApiState {
        store,
        metrics,
        limits,
        reader,
        redis: None,
    })
    .layer(crate::auth::layer(tenants))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_201_600_123;

    fn params(q: &str) -> Vec<(String, String)> {
        q.split('&')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[test]
    fn times() {
        let check = |s: &str, want: Option<u64>| assert_eq!(parse_time(s), want, "{s}");
        check("0", Some(0));
        check("1764201600123", Some(1_764_201_600_123));
        check("2025-11-27T00:00:00Z", Some(1_764_201_600_000));
        check("2025-11-27T00:00:00.123Z", Some(1_764_201_600_123));
        check("2025-11-27T00:00:00.1z", Some(1_764_201_600_100));
        check("2025-11-27T00:00:00.123456789Z", Some(1_764_201_600_123));
        check("2025-11-27t01:30:00+01:30", Some(1_764_201_600_000));
        check("2025-11-26T22:00:00-02:00", Some(1_764_201_600_000));
        check("1970-01-01T00:00:00Z", Some(0));
        check("2024-02-29T00:00:00Z", Some(1_709_164_800_000));
        check("2025-02-29T00:00:00Z", None);
        check("2025-11-27T24:00:00Z", None);
        check("2025-11-27T00:00:00", None);
        check("2025-11-27T00:00:00.Z", None);
        check("2025-11-27", None);
        check("1969-12-31T23:59:59Z", None);
        check("-5", None);
        check("", None);
        check("99999999999999999999", None);
        check("253402300800000", None);
        check("1.5", None);
    }

    #[test]
    fn metrics_queries() {
        let r = Retention::default();
        let l = QueryLimits::default();
        let ok = |campaign: u64, q: &str, want: MetricsQuery| {
            assert_eq!(
                parse_metrics_query(campaign, &params(q), NOW, &r, &l),
                Ok(want),
                "{q}"
            );
        };
        let all = |window, from_ms, to_ms| MetricsQuery {
            campaign_id: 7,
            window,
            dim: Dim::All,
            from_ms,
            to_ms,
        };
        ok(7, "window=5m&from=0&to=600000", all(Window::M5, 0, 600_000));
        ok(
            7,
            "window=1h&from=2025-11-27T00:00:00Z&to=1764205200000",
            all(Window::H1, 1_764_201_600_000, 1_764_205_200_000),
        );
        ok(7, "window=1d", all(Window::D1, NOW + 1 - r.d1_ms, NOW + 1));
        ok(
            7,
            "window=5m&to=1000000000",
            all(Window::M5, 1_000_000_000 - r.m5_ms, 1_000_000_000),
        );
        ok(7, "window=5m&from=5&to=5", all(Window::M5, 5, 5));
        ok(
            7,
            "window=5m&from=0&to=1&country=US",
            MetricsQuery {
                dim: Dim::Country(*b"US"),
                ..all(Window::M5, 0, 1)
            },
        );
        ok(
            7,
            "window=5m&from=0&to=1&device=ctv",
            MetricsQuery {
                dim: Dim::Device(Device::Ctv),
                ..all(Window::M5, 0, 1)
            },
        );
        ok(
            7,
            "window=5m&from=0&to=1&ad_id=9",
            MetricsQuery {
                dim: Dim::Ad(9),
                ..all(Window::M5, 0, 1)
            },
        );
        ok(
            7,
            "window=5m&from=0&to=1&publisher_id=3&publisher_id=3",
            MetricsQuery {
                dim: Dim::Publisher(3),
                ..all(Window::M5, 0, 1)
            },
        );
        ok(7, "window=5m&from=0&to=1&unknown=x", all(Window::M5, 0, 1));

        let err = |campaign: u64, q: &str, field: &str, msg: &str| {
            let e = parse_metrics_query(campaign, &params(q), NOW, &r, &l).unwrap_err();
            assert_eq!(e.field, Some(field), "{q}: {e:?}");
            assert!(e.error.contains(msg), "{q}: {e:?}");
        };
        err(7, "", "window", "missing window");
        err(7, "window=1w", "window", "bad window");
        err(7, "window=5m&from=abc", "from", "RFC 3339");
        err(7, "window=5m&to=2025-13-01T00:00:00Z", "to", "bad to");
        err(7, "window=5m&from=10&to=5", "from", "after");
        err(
            7,
            "window=5m&from=0&to=1764201600000",
            "to",
            "range too long",
        );
        err(7, "window=5m&country=us", "country", "uppercase");
        err(7, "window=5m&country=USA", "country", "uppercase");
        err(7, "window=5m&device=phone", "device", "bad device");
        err(7, "window=5m&ad_id=x", "ad_id", "bad ad_id");
        err(
            7,
            "window=5m&publisher_id=",
            "publisher_id",
            "bad publisher_id",
        );
        err(
            7,
            "window=5m&country=US&device=mobile",
            "device",
            "at most one",
        );
        err(7, "window=5m&ad_id=1&ad_id=2", "ad_id", "at most one");
    }

    #[test]
    fn campaign_ids() {
        // The tenant check and the handlers both take the id from here, after the router
        // has percent-decoded the path segment.
        assert_eq!(parse_campaign_id("123"), Ok(123));
        assert_eq!(parse_campaign_id("+123"), Ok(123));
        assert_eq!(parse_campaign_id("0123"), Ok(123));
        for bad in [
            "x",
            "-1",
            "",
            " 123",
            "12 3",
            "18446744073709551616",
            "\u{ff11}23",
        ] {
            let e = parse_campaign_id(bad).unwrap_err();
            assert_eq!(e.field, Some("campaign_id"), "{bad}");
        }
    }

    #[test]
    fn top_queries() {
        let l = QueryLimits::default();
        let ok = |q: &str, want: TopQuery| {
            assert_eq!(parse_top_query(&params(q), NOW, &l), Ok(want), "{q}")
        };
        ok(
            "window=5m",
            TopQuery {
                window: Window::M5,
                start: Window::M5.bucket_start(NOW),
                n: 10,
            },
        );
        ok(
            "window=1h&n=3&at=2025-11-27T00:59:59Z",
            TopQuery {
                window: Window::H1,
                start: 1_764_201_600_000,
                n: 3,
            },
        );
        ok(
            "window=1d&n=1000&at=0",
            TopQuery {
                window: Window::D1,
                start: 0,
                n: 1000,
            },
        );
        let err = |q: &str, field: &str| {
            let e = parse_top_query(&params(q), NOW, &l).unwrap_err();
            assert_eq!(e.field, Some(field), "{q}: {e:?}");
        };
        err("", "window");
        err("window=2h", "window");
        err("window=5m&n=0", "n");
        err("window=5m&n=1001", "n");
        err("window=5m&n=x", "n");
        err("window=5m&at=yesterday", "at");
    }
}
