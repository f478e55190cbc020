//! The flusher task: outbox → Redis, round after round.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::apply::Applier;
use super::conn::RedisConn;
use super::outbox::Outbox;

/// The flusher: every `flush_interval_ms` (at once while a round comes back full),
/// takes frames from the outbox, applies them, advances the cursor; on error keeps them
/// and retries with a doubling backoff.
pub async fn flusher(applier: Arc<Applier>, outbox: Outbox, mut stop: watch::Receiver<bool>) {
    let cfg = applier.cfg.clone();
    let stats = applier.stats.clone();
    let mut conn: Option<RedisConn> = None;
    let mut backoff = cfg.retry_backoff_min_ms;
    let mut every = tokio::time::interval(Duration::from_millis(cfg.flush_interval_ms));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    loop {
        if !stopping {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.changed() => stopping = true,
            }
        }
        let r = flush_round(&applier, &outbox, &mut conn).await;
        match r {
            Ok(more) => {
                stats.up.store(true, Ordering::Relaxed);
                backoff = cfg.retry_backoff_min_ms;
                if more {
                    every.reset_immediately();
                    continue;
                }
                if stopping {
                    return;
                }
            }
            Err(e) => {
                stats.up.store(false, Ordering::Relaxed);
                stats.flush_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %format!("{e:#}"), backoff_ms = backoff, backlog_bytes = outbox.backlog_bytes(), "redis flush failed; deltas kept, retrying");
                if stopping {
                    return; // the outbox keeps them for the next start
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(backoff)) => {}
                    _ = stop.changed() => stopping = true,
                }
                backoff = (backoff * 2).min(cfg.retry_backoff_max_ms);
            }
        }
    }
}

/// One round: `Ok(true)` if the outbox has more right away.
async fn flush_round(
    applier: &Applier,
    outbox: &Outbox,
    conn: &mut Option<RedisConn>,
) -> anyhow::Result<bool> {
    let cfg = &applier.cfg;
    let ob = outbox.clone();
    let (frames_max, bytes_max) = (cfg.flush_frames_max, cfg.flush_bytes_max);
    let (bodies, cursor) =
        tokio::task::spawn_blocking(move || ob.read_batch(frames_max, bytes_max)).await??;
    if conn.is_none() {
        *conn = Some(
            RedisConn::connect_tls(
                &cfg.urls,
                cfg.tls_ca.as_deref(),
                Duration::from_millis(cfg.timeout_ms),
            )
            .await?,
        );
    }
    let c = conn.as_mut().expect("set above");
    if bodies.is_empty() {
        // Nothing to write: still tell /readyz whether Redis answers.
        let mut p = redis::pipe();
        p.cmd("PING");
        if let Err(e) = c.pipe(&p, Duration::from_millis(cfg.timeout_ms)).await {
            *conn = None;
            return Err(e);
        }
        return Ok(false);
    }
    if let Err(e) = applier.apply_round(c, &bodies, crate::now_ms()).await {
        if !c.is_cluster() {
            *conn = None; // reconnect: the connection may be in any state after a timeout
        }
        return Err(e);
    }
    applier
        .stats
        .flushed_frames
        .fetch_add(bodies.len() as u64, Ordering::Relaxed);
    let bytes: usize = bodies.iter().map(|b| b.len()).sum();
    let ob = outbox.clone();
    tokio::task::spawn_blocking(move || ob.advance(cursor)).await??;
    Ok(bodies.len() >= frames_max || bytes >= bytes_max)
}
