//! Answers one complete request: health, readiness, metrics, and the two ingest routes
//! (line bound and per-address rate limit before any parse, then [`crate::pipeline`]).
//! Synchronous: nothing here waits; the connection waits once per read for durability.

use std::net::IpAddr;

use crate::config::AckMode;
use crate::connection::Batch;
use crate::http::{self, Head, Method, Route};
use crate::metrics::Unavailable;
use crate::pipeline::{self, Outcome, Scratch, Stages};
use crate::response::{self, ContentType, Extra, Status};
use crate::shard::Shard;
use clickgate_core::EventError;

enum IngestError {
    RateLimited(u64),
    Unavailable(Unavailable),
}

/// Answers one complete request; returns the status written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn handle(
    shard: &Shard,
    head: &Head,
    req: &[u8],
    out: &mut Vec<u8>,
    body: &mut Vec<u8>,
    scratch: &mut Scratch,
    batch: &mut Batch,
    peer: Option<IpAddr>,
    exempt: bool,
    now_ms: u64,
    close: bool,
) -> Status {
    body.clear();
    let req_body = &req[head.head_len..];
    let mut extra = Extra {
        close,
        ..Extra::default()
    };
    let mut ct = ContentType::Json;
    let status = match (head.route, head.method) {
        (Route::NotFound, _) => {
            response::body_error(body, "not found");
            Status::NotFound
        }
        (route, method) if route.allowed() != Some(method) => {
            response::body_error(body, "method not allowed");
            extra.allow = Some(if route.allowed() == Some(Method::Post) {
                "POST"
            } else {
                "GET"
            });
            Status::MethodNotAllowed
        }
        (Route::Healthz, _) => {
            body.extend_from_slice(br#"{"status":"ok"}"#);
            Status::Ok
        }
        (Route::Readyz, _) => match not_ready(shard) {
            None => {
                body.extend_from_slice(br#"{"status":"ready"}"#);
                Status::Ok
            }
            Some(why) => {
                response::body_error(body, why);
                extra.retry_after_secs = Some(shard.cfg.retry_after_secs);
                Status::Unavailable
            }
        },
        (Route::Metrics, _) => {
            shard.refresh_gauges();
            let mut text = String::with_capacity(8192);
            crate::metrics::render(&shard.metrics, &mut text);
            if let Some(sink) = shard.cfg.sink.as_deref() {
                sink.render(shard.metrics.len(), &mut text);
            }
            body.extend_from_slice(text.as_bytes());
            ct = ContentType::PromText;
            Status::Ok
        }
        (Route::Click, _) | (Route::Clicks, _) => {
            let r = ingest(
                shard, head.route, req_body, body, scratch, batch, peer, exempt, now_ms,
            );
            match r {
                Ok(status) => status,
                Err(IngestError::RateLimited(retry_ms)) => {
                    shard.m().rate_limited();
                    response::body_error(body, "rate limited");
                    extra.retry_after_secs = Some(retry_ms.div_ceil(1000).max(1) as u32);
                    Status::TooManyRequests
                }
                Err(IngestError::Unavailable(why)) => {
                    shard.m().unavailable(why);
                    response::body_error(body, why.message());
                    extra.retry_after_secs = Some(shard.cfg.retry_after_secs);
                    Status::Unavailable
                }
            }
        }
    };
    if status == Status::Accepted
        && matches!(shard.cfg.ack, AckMode::Disk | AckMode::Kafka)
        && batch.first_202_at.is_none()
    {
        batch.first_202_at = Some(out.len());
    }
    batch.count_response();
    shard.m().request(head.route, status);
    response::write_response(out, status, ct, extra, body);
    status
}

fn not_ready(shard: &Shard) -> Option<&'static str> {
    if shard.stopping.get() {
        return Some("shutting down");
    }
    if shard.log.pending_bytes() >= shard.cfg.log_buffer_bytes_max {
        return Some("log buffer full");
    }
    if shard.log.failed() {
        return Some("log not writable");
    }
    if let Some(sink) = shard.cfg.sink.as_deref() {
        return sink.state().reason();
    }
    None
}

/// `POST /v1/click` and `POST /v1/clicks`: writes the 202/400/413 body, or returns the
/// 429/503 for the caller to write.
#[allow(clippy::too_many_arguments)]
fn ingest(
    shard: &Shard,
    route: Route,
    req_body: &[u8],
    body: &mut Vec<u8>,
    scratch: &mut Scratch,
    batch: &mut Batch,
    peer: Option<IpAddr>,
    exempt: bool,
    now_ms: u64,
) -> Result<Status, IngestError> {
    let cfg = &shard.cfg;
    // Count before parsing: the line bound and the rate limit cost no parse work.
    let events = match route {
        Route::Click => 1,
        _ => http::ndjson_count(req_body, cfg.batch_events_max),
    };
    if events > cfg.batch_events_max {
        let mut num = itoa::Buffer::new();
        body.extend_from_slice(b"{\"error\":\"too many events: at most ");
        body.extend_from_slice(num.format(cfg.batch_events_max).as_bytes());
        body.extend_from_slice(b" per request\"}");
        return Ok(Status::PayloadTooLarge);
    }
    // One bucket per address for the whole box, whatever core answers.
    if let (Some(ip), false) = (peer, exempt) {
        if events > 0 {
            shard
                .shared
                .limiter
                .try_take(ip, events as u32, now_ms)
                .map_err(IngestError::RateLimited)?;
        }
    }
    let rules = shard.rules.snapshot();
    let mut agg = shard.agg.borrow_mut();
    let mut st = Stages {
        shared: &shard.shared,
        rules: &rules,
        agg: &mut agg,
        log: &shard.log,
        metrics: shard.m(),
        ts_skew_ms: cfg.ts_skew_ms,
    };
    let outcome = pipeline::ingest(&mut st, route == Route::Click, req_body, now_ms, scratch)
        .map_err(IngestError::Unavailable)?;
    match outcome {
        Outcome::Invalid => {
            match scratch.rejected.first() {
                Some((_, e)) => response::body_invalid(body, e),
                None => response::body_invalid(body, &EventError::syntax("no events in body")),
            }
            Ok(Status::BadRequest)
        }
        Outcome::Accepted {
            accepted,
            duplicates,
            max_lsn,
            ..
        } => {
            batch.max_lsn = batch.max_lsn.max(max_lsn);
            response::body_accepted(body, accepted, duplicates, &scratch.rejected);
            scratch.rejected.clear();
            Ok(Status::Accepted)
        }
    }
}
