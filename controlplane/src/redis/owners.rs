//! Campaign ownership shared by every box through Redis, so that each box's query API
//! answers who owns a campaign alike (tenant isolation across boxes).
//!
//! Key `owners:{owners}` (with the key prefix; one hash, one Cluster slot): campaign id →
//! advertiser id, written with `HSETNX`, so the first box to report a campaign decides
//! and the answer never changes afterwards. Like every key, it expires: each write
//! pipeline sets its TTL to the longest window's (`redis_ttl_1d_secs` + a day), so it
//! lives that long after the last campaign any box reported. Every `OWNERS_SYNC` the sync
//! task:
//! 1. writes the campaigns the embedded store learnt since its last successful write
//!    (pipelines of [`WRITE_BATCH`] `HSETNX` and one `PEXPIRE`; all of them again when
//!    the hash shrank, i.e. expired);
//! 2. reads `HLEN`; when it differs from the copy it holds, reads the whole hash again
//!    (`HSCAN`, [`SCAN_COUNT`] per call), at most [`OWNERS_MAX`] campaigns.
//!
//! Reads never wait for Redis: [`SharedOwners`] is the last copy read; a campaign first
//! reported on another box is visible here within one sync interval. While Redis is
//! down the last copy and the box's own store answer.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::Value;
use tokio::sync::watch;

use super::query::RedisQuery;
use crate::store::Store;

/// How often ownership is written and read back.
pub const OWNERS_SYNC: Duration = Duration::from_secs(1);
/// Campaigns held from Redis, at most (beyond it the copy is partial and a warning says so).
pub const OWNERS_MAX: usize = 1_000_000;
/// `HSETNX` per pipeline.
pub const WRITE_BATCH: usize = 1000;
/// `HSCAN` `COUNT` per call.
pub const SCAN_COUNT: usize = 1000;

/// The shared ownership map as last read from Redis.
#[derive(Default)]
pub struct SharedOwners {
    map: RwLock<HashMap<u64, u64>>,
}

impl SharedOwners {
    pub fn owner(&self, campaign_id: u64) -> Option<u64> {
        self.read().get(&campaign_id).copied()
    }

    /// `(campaign, advertiser)` pairs, `advertiser`'s only when given (unsorted).
    pub fn campaigns(&self, advertiser: Option<u64>) -> Vec<(u64, u64)> {
        self.read()
            .iter()
            .filter(|(_, &a)| advertiser.is_none_or(|want| want == a))
            .map(|(&c, &a)| (c, a))
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, u64>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn replace(&self, m: HashMap<u64, u64>) {
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = m;
    }
}

fn key(q: &RedisQuery) -> String {
    format!("{}owners:{{owners}}", q.keys.prefix)
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// One sync: write what the store learnt, read the hash back when it changed.
async fn sync_once(
    q: &RedisQuery,
    store: &RwLock<Store>,
    shared: &SharedOwners,
    written: &mut HashSet<u64>,
    read_len: &mut Option<usize>,
    ttl_ms: u64,
) -> anyhow::Result<()> {
    let key = key(q);
    let fresh: Vec<(u64, u64)> = store
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .campaigns(None)
        .into_iter()
        .filter(|(c, _)| !written.contains(c))
        .collect();
    let mut conn = q.conn().await?;
    for chunk in fresh.chunks(WRITE_BATCH) {
        let mut p = redis::pipe();
        for (c, a) in chunk {
            p.cmd("HSETNX").arg(&key).arg(c).arg(a).ignore();
        }
        p.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
        conn.pipe(&p, q.timeout).await?;
        written.extend(chunk.iter().map(|(c, _)| *c));
    }
    let len = conn
        .pipe(redis::pipe().cmd("HLEN").arg(&key), q.timeout)
        .await?
        .first()
        .and_then(int)
        .unwrap_or(0) as usize;
    // The hash only grows (first report wins): the same length is the same content.
    if *read_len == Some(len) {
        return Ok(());
    }
    if read_len.is_some_and(|was| len < was) {
        // Expired (or deleted): report every campaign again on the next sync.
        written.clear();
    }
    let mut m = HashMap::with_capacity(len.min(OWNERS_MAX));
    let mut cursor = 0u64;
    loop {
        let r = conn
            .pipe(
                redis::pipe()
                    .cmd("HSCAN")
                    .arg(&key)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(SCAN_COUNT),
                q.timeout,
            )
            .await?;
        let Some(Value::Array(parts)) = r.into_iter().next() else {
            anyhow::bail!("HSCAN {key}: unexpected reply");
        };
        let (Some(next), Some(Value::Array(fields))) = (parts.first().and_then(int), parts.get(1))
        else {
            anyhow::bail!("HSCAN {key}: unexpected reply");
        };
        for pair in fields.chunks_exact(2) {
            if let (Some(c), Some(a)) = (int(&pair[0]), int(&pair[1])) {
                if m.len() < OWNERS_MAX {
                    m.insert(c, a);
                }
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    if len > OWNERS_MAX {
        tracing::warn!(
            campaigns = len,
            held = OWNERS_MAX,
            "Redis campaign owners beyond the bound: the copy is partial"
        );
    }
    shared.replace(m);
    *read_len = Some(len);
    Ok(())
}

/// The sync task: every [`OWNERS_SYNC`] until `stop`.
pub async fn sync_task(
    q: Arc<super::RedisSide>,
    store: Arc<RwLock<Store>>,
    shared: Arc<SharedOwners>,
    ttl_ms: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut written = HashSet::new();
    let mut read_len = None;
    let mut failing = false;
    loop {
        match sync_once(
            &q.query,
            &store,
            &shared,
            &mut written,
            &mut read_len,
            ttl_ms,
        )
        .await
        {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %format!("{e:#}"), "Redis campaign owners: sync failed; retrying every second");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(OWNERS_SYNC) => {}
            _ = stop.changed() => return,
        }
    }
}
