//! Reads for the query API and the HTTP handlers' view of the Redis side.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clickgate_core::agg::Dim;
use clickgate_core::window::Window;
use redis::Value;

use super::config::RedisConfig;
use super::conn::RedisConn;
use super::keys::Keys;
use super::metrics::RedisStats;
use super::outbox::Outbox;
use super::scripts::{TOP_LUA, TOP_OF_LUA, TOP_OF_SCAN_MAX, TOP_TIES_MAX};
use crate::store::{BucketOut, TopAd};

/// Reads for the query API. Connects on first use (and again after a failed connect), so
/// a controlplane starts while Redis is down.
pub struct RedisQuery {
    urls: Vec<String>,
    tls_ca: Option<Vec<u8>>,
    conn: tokio::sync::Mutex<Option<RedisConn>>,
    pub keys: Keys,
    pub timeout: Duration,
    pub stats: Arc<RedisStats>,
}

/// Everything the HTTP handlers need of the Redis side.
pub struct RedisSide {
    pub query: RedisQuery,
    pub outbox: Outbox,
    pub stats: Arc<RedisStats>,
    /// Campaign ownership as every box reported it (`owners`).
    pub owners: Arc<super::owners::SharedOwners>,
}

impl RedisSide {
    /// `/readyz`: Redis answers, or what it has not taken yet fits the outbox.
    pub fn ready(&self) -> bool {
        !self.outbox.is_full()
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "redis": if self.stats.up.load(Ordering::Relaxed) { "up" } else { "unreachable" },
            "redis_backlog_bytes": self.outbox.backlog_bytes(),
            "redis_outbox_full": self.outbox.is_full(),
        })
    }
}

fn int(v: &Value) -> anyhow::Result<u64> {
    Ok(match v {
        Value::Nil => 0,
        Value::Int(i) => u64::try_from(*i).unwrap_or(0),
        Value::BulkString(b) => std::str::from_utf8(b)?.parse()?,
        Value::SimpleString(s) => s.parse()?,
        other => anyhow::bail!("unexpected Redis reply {other:?}"),
    })
}

impl RedisQuery {
    pub fn new(cfg: &RedisConfig, stats: Arc<RedisStats>) -> RedisQuery {
        RedisQuery {
            urls: cfg.urls.clone(),
            tls_ca: cfg.tls_ca.clone(),
            conn: tokio::sync::Mutex::new(None),
            keys: Keys {
                prefix: cfg.key_prefix.clone(),
            },
            timeout: Duration::from_millis(cfg.timeout_ms),
            stats,
        }
    }

    /// The shared connection, connecting on first use (and again after a failed connect).
    pub async fn conn(&self) -> anyhow::Result<RedisConn> {
        let mut g = self.conn.lock().await;
        if let Some(c) = &*g {
            return Ok(c.clone());
        }
        let c = RedisConn::connect_tls(&self.urls, self.tls_ca.as_deref(), self.timeout)
            .await
            .inspect_err(|_| {
                self.stats.query_errors.fetch_add(1, Ordering::Relaxed);
            })?;
        *g = Some(c.clone());
        Ok(c)
    }

    /// A campaign's buckets with start in `[from, to)`: one pipeline (one round trip, one
    /// slot) of `HMGET` + `PFCOUNT` per bucket.
    pub async fn series(
        &self,
        campaign: u64,
        w: Window,
        dim: Dim,
        from_ms: u64,
        to_ms: u64,
    ) -> anyhow::Result<Vec<BucketOut>> {
        let starts: Vec<u64> = w.bucket_starts(from_ms, to_ms).collect();
        if starts.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for &s in &starts {
            p.cmd("HMGET")
                .arg(self.keys.counter(campaign, w, s, dim))
                .arg("clicks")
                .arg("cost_micros")
                .arg("fraud_clicks");
            p.cmd("PFCOUNT").arg(self.keys.users(campaign, w, s, dim));
        }
        let mut conn = self.conn().await?;
        let r = conn.pipe(&p, self.timeout).await.inspect_err(|_| {
            self.stats.query_errors.fetch_add(1, Ordering::Relaxed);
        })?;
        anyhow::ensure!(r.len() == 2 * starts.len(), "short Redis reply");
        let mut out = Vec::new();
        for (i, &start) in starts.iter().enumerate() {
            let Value::Array(h) = &r[2 * i] else {
                anyhow::bail!("unexpected HMGET reply {:?}", r[2 * i]);
            };
            anyhow::ensure!(h.len() == 3, "unexpected HMGET reply");
            let b = BucketOut {
                start,
                clicks: int(&h[0])?,
                cost_micros: int(&h[1])?,
                fraud_clicks: int(&h[2])?,
                unique_users: int(&r[2 * i + 1])?,
            };
            if b.clicks | b.cost_micros | b.fraud_clicks | b.unique_users != 0 {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// The `n` ads with most billable clicks in one bucket, ties as the embedded store
    /// orders them (lower campaign, then lower ad first): one script call.
    pub async fn top(&self, w: Window, start: u64, n: usize) -> anyhow::Result<Vec<TopAd>> {
        let script = redis::Script::new(TOP_LUA);
        let key = self.keys.top(w, start);
        let mut inv = script.key(&key);
        inv.arg(n).arg(TOP_TIES_MAX);
        let (head, tied): (Scored, Scored) = self.invoke(&inv, "top").await?;
        Ok(top_ads(head.iter().chain(tied.iter()), n))
    }

    /// [`RedisQuery::top`] among `campaigns` only (an advertiser's own top `n`, ties
    /// included before the cut), one script call that reads at most [`TOP_OF_SCAN_MAX`]
    /// members of the bucket.
    pub async fn top_of(
        &self,
        w: Window,
        start: u64,
        n: usize,
        campaigns: &[u64],
    ) -> anyhow::Result<Vec<TopAd>> {
        let script = redis::Script::new(TOP_OF_LUA);
        let key = self.keys.top(w, start);
        let mut inv = script.key(&key);
        inv.arg(n).arg(TOP_OF_SCAN_MAX);
        for c in campaigns {
            inv.arg(*c);
        }
        let found: Vec<(String, f64)> = self.invoke(&inv, "top").await?;
        Ok(top_ads(found.iter(), n))
    }

    /// Runs a read-only script under the query timeout.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        what: &str,
    ) -> anyhow::Result<T> {
        let mut conn = self.conn().await?;
        let fut = async {
            match &mut conn {
                RedisConn::Single(c) => inv.invoke_async::<T>(c).await,
                RedisConn::Cluster(c) => inv.invoke_async::<T>(c).await,
            }
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| anyhow::anyhow!("Redis {what} query timed out"))?
            .inspect_err(|_| {
                self.stats.query_errors.fetch_add(1, Ordering::Relaxed);
            })
            .map_err(Into::into)
    }
}

/// `(member, score)` pairs as a script answers them.
type Scored = Vec<(String, f64)>;

/// `campaign:ad` members with their scores into the top `n`, ordered as the embedded
/// store orders them.
fn top_ads<'a>(members: impl Iterator<Item = &'a (String, f64)>, n: usize) -> Vec<TopAd> {
    let mut ads: Vec<TopAd> = Vec::new();
    for (m, score) in members {
        let Some((c, a)) = m.split_once(':') else {
            continue;
        };
        let (Ok(campaign_id), Ok(ad_id)) = (c.parse(), a.parse()) else {
            continue;
        };
        let t = TopAd {
            ad_id,
            campaign_id,
            clicks: *score as u64,
        };
        if t.clicks > 0 && !ads.contains(&t) {
            ads.push(t);
        }
    }
    ads.sort_unstable_by(|a, b| {
        b.clicks
            .cmp(&a.clicks)
            .then(a.campaign_id.cmp(&b.campaign_id))
            .then(a.ad_id.cmp(&b.ad_id))
    });
    ads.truncate(n);
    ads
}
