//! The advertiser dashboard and the two query routes it needs beyond docs/api.md.
//!
//! - `GET /` and `GET /assets/{dashboard.js,dashboard.css}`: one static page, embedded in
//!   the binary (`include_str!`, no CDN, no build step). It asks for the API key, keeps it
//!   in `sessionStorage`, and reads the JSON API every few seconds: charts are plain SVG
//!   drawn by `dashboard.js`, and every number drawn is also in the DOM (`data-*`
//!   attributes and a table) so a test can compare it with the API.
//! - `GET /v1/campaigns`: the campaigns visible to the caller (all for admin or an open
//!   API; an advertiser's own otherwise), from the store's owner map:
//!   `{"campaigns":[{"campaign_id":..,"advertiser_id":..}]}` ascending.
//! - `GET /v1/campaigns/{id}/breakdown?window=..&by=country|device[&from=T][&to=T][&n=N]`:
//!   the campaign's counters over the range, per country or device, most clicks first:
//!   `{"campaign_id":..,"window":"1h","by":"country","values":[{"value":"US","clicks":..,
//!   "cost_micros":..,"fraud_clicks":..}]}`. `from`/`to`/`n` as in docs/api.md's queries.
//!
//! Both are additions to the contract (old clients are unaffected); tenant checks are
//! [`crate::auth`]'s extractors, which these handlers take their caller and campaign from.

use std::sync::{Arc, RwLock};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clickgate_core::agg::Dim;

use crate::auth::{json_error, Caller, VisibleCampaign};
use crate::metrics::Metrics;
use crate::query::{backend_unavailable, parse_metrics_query, QueryLimits};
use crate::read::CounterRead;
use crate::store::Store;

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");

#[derive(Clone)]
pub(crate) struct DashState {
    pub store: Arc<RwLock<Store>>,
    pub metrics: Arc<Metrics>,
    pub limits: QueryLimits,
    /// The query API's one read interface.
    pub reader: Arc<dyn CounterRead>,
    /// Whether API keys are configured: the page asks for one before any call.
    pub keys_required: bool,
}

fn asset(content_type: &'static str, body: impl IntoResponse) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

#[derive(serde::Serialize)]
struct CampaignOut {
    campaign_id: u64,
    advertiser_id: u64,
}

async fn campaigns(State(st): State<DashState>, Caller(who): Caller) -> Response {
    st.metrics.inc(&st.metrics.queries_campaigns);
    let list: Vec<CampaignOut> = st
        .reader
        .campaigns(who.advertiser())
        .into_iter()
        .map(|(campaign_id, advertiser_id)| CampaignOut {
            campaign_id,
            advertiser_id,
        })
        .collect();
    Json(serde_json::json!({ "campaigns": list })).into_response()
}

#[derive(serde::Serialize)]
struct ValueOut {
    value: String,
    clicks: u64,
    cost_micros: u64,
    fraud_clicks: u64,
}

async fn breakdown(
    State(st): State<DashState>,
    campaign: VisibleCampaign,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let Ok(Query(params)) = q else {
        return json_error(StatusCode::BAD_REQUEST, "bad query string");
    };
    let by = params.iter().rev().find(|(k, _)| k == "by").map(|(_, v)| v);
    let (kind, by) = match by.map(String::as_str) {
        Some("country") => (Dim::KIND_COUNTRY, "country"),
        Some("device") => (Dim::KIND_DEVICE, "device"),
        _ => {
            return bad(
                "by",
                "missing or bad `by`: expected country or device".into(),
            )
        }
    };
    let n = match params.iter().rev().find(|(k, _)| k == "n") {
        None => st.limits.top_n_default,
        Some((_, v)) => match v.parse::<usize>() {
            Ok(n) if (1..=st.limits.top_n_max).contains(&n) => n,
            _ => {
                return bad(
                    "n",
                    format!("bad n {v:?}: expected 1..={}", st.limits.top_n_max),
                )
            }
        },
    };
    // The filters of a metrics query make no sense here: drop them before validating.
    let params: Vec<(String, String)> = params
        .into_iter()
        .filter(|(k, _)| matches!(k.as_str(), "window" | "from" | "to"))
        .collect();
    let retention = st
        .store
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .retention();
    let q = match parse_metrics_query(
        campaign.id,
        &params,
        crate::now_ms(),
        &retention,
        &st.limits,
    ) {
        Ok(q) => q,
        Err(e) => {
            st.metrics.inc(&st.metrics.queries_bad);
            return (StatusCode::BAD_REQUEST, Json(e)).into_response();
        }
    };
    let values = match st
        .reader
        .breakdown(q.campaign_id, q.window, kind, q.from_ms, q.to_ms)
        .await
    {
        Ok(v) => v,
        Err(e) => return backend_unavailable(e),
    };
    let values: Vec<ValueOut> = values
        .into_iter()
        .take(n)
        .map(|(dim, c)| ValueOut {
            value: match dim {
                Dim::Country(cc) => String::from_utf8_lossy(&cc).into_owned(),
                Dim::Device(d) => d.as_str().to_string(),
                other => format!("{other:?}"),
            },
            clicks: c.clicks,
            cost_micros: c.cost_micros,
            fraud_clicks: c.fraud_clicks,
        })
        .collect();
    Json(serde_json::json!({
        "campaign_id": q.campaign_id,
        "window": q.window.as_str(),
        "by": by,
        "values": values,
    }))
    .into_response()
}

fn bad(field: &'static str, error: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": error, "field": field })),
    )
        .into_response()
}

pub(crate) fn router(st: DashState) -> Router {
    let page = PAGE.replace(
        "__KEYS_REQUIRED__",
        if st.keys_required { "true" } else { "false" },
    );
    Router::new()
        .route(
            "/",
            get(move || {
                let page = page.clone();
                async move { asset("text/html; charset=utf-8", page) }
            }),
        )
        .route(
            "/assets/dashboard.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/assets/dashboard.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route("/v1/campaigns", get(campaigns))
        .route("/v1/campaigns/{campaign_id}/breakdown", get(breakdown))
        .with_state(st)
}
