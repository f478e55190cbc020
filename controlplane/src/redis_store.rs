//! The Redis real-time store: the flusher that writes applied deltas to Redis, exactly
//! once, and the reads the query API makes there when `redis_url` is set.
//!
//! Keys (`{…}` is the Redis Cluster hash tag, so one campaign's keys share a slot):
//! - `counter:{campaign}:{window}:{bucket_start}:{dim}` — hash `clicks`, `cost_micros`,
//!   `fraud_clicks`; `dim` is `all`, `country=US`, `device=mobile`, `ad=678`,
//!   `publisher=42`.
//! - `users:{campaign}:{window}:{bucket_start}:{dim}` — a Redis HyperLogLog, the union
//!   of every box's and core's sketch (`PFMERGE`, see [`crate::redis_hll`]).
//! - `top:{window:bucket_start}` — sorted set of `campaign:ad` by billable clicks.
//! - `applied:{tag}` — hash `box:instance:core` → last delta id applied to that tag.
//! - every key gets `PEXPIREAT bucket end + ttl(window)`; marks live as long as the
//!   longest of them. An optional `redis_key_prefix` goes in front of all of them.
//!
//! Exactly once: a frame's keys are grouped by hash tag and each group is one `EVALSHA`
//! of [`APPLY_LUA`], which does nothing if the group's mark is at or above the frame's
//! delta id, else applies everything and sets the mark, atomically (a Lua script runs
//! whole). Frames of one `(box, instance, core)` reach Redis in delta id order (the
//! outbox keeps the store's apply order, a pipeline keeps its order per slot, a retry
//! resends the whole batch), so a retried or replayed flush is skipped, never added twice.
//! HLL merges run first in a script: if one fails, nothing non-idempotent happened yet.
//!
//! Round trips: single node, one pipeline of up to `pipeline_commands_max` inner commands;
//! cluster, one pipeline per hash tag (the cluster client refuses cross-slot pipelines),
//! run concurrently. A frame's 5m entries are rolled up into their 1h and 1d keys here
//! (summed per key first), like the embedded store does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clickgate_core::agg::{Counters, Dim};
use clickgate_core::hll::Hll;
use clickgate_core::window::Window;
use clickgate_core::Device;
use clickgate_proto::frames::{access_delta, entry_parts};
use redis::aio::ConnectionLike;
use redis::{Pipeline, Value};
use tokio::sync::watch;

use crate::redis_outbox::Outbox;
use crate::store::{BucketOut, TopAd};

/// Applies one hash tag's share of a delta frame once. See the module doc.
/// KEYS[1] marks hash, KEYS[2..n-1] targets, KEYS[n] scratch key for HLL merges.
/// ARGV[1] mark field, ARGV[2] delta id (20 digits: compared as strings), ARGV[3] marks
/// PEXPIREAT; then per target: op (`u` HLL, `h` counters, `z` top), PEXPIREAT, args.
pub const APPLY_LUA: &str = r#"
local last = redis.call('HGET', KEYS[1], ARGV[1])
if last and last >= ARGV[2] then return 0 end
local scratch = KEYS[#KEYS]
local a = 4
for k = 2, #KEYS - 1 do
  local key, op, at = KEYS[k], ARGV[a], ARGV[a + 1]
  if op == 'u' then
    if redis.call('EXISTS', key) == 0 then
      redis.call('SET', key, ARGV[a + 2])
    else
      redis.call('SET', scratch, ARGV[a + 2])
      redis.call('PFMERGE', key, scratch)
      redis.call('DEL', scratch)
    end
    a = a + 3
  elseif op == 'h' then
    if ARGV[a + 2] ~= '0' then redis.call('HINCRBY', key, 'clicks', ARGV[a + 2]) end
    if ARGV[a + 3] ~= '0' then redis.call('HINCRBY', key, 'cost_micros', ARGV[a + 3]) end
    if ARGV[a + 4] ~= '0' then redis.call('HINCRBY', key, 'fraud_clicks', ARGV[a + 4]) end
    a = a + 5
  else
    redis.call('ZINCRBY', key, ARGV[a + 2], ARGV[a + 3])
    a = a + 4
  end
  redis.call('PEXPIREAT', key, at)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return 1
"#;

/// Top-N with the embedded store's tie order: the first `n` by score, plus every member
/// tied with the n-th (at most `ARGV[2]`), sorted by the caller.
const TOP_LUA: &str = r#"
local r = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
if #r < 2 * tonumber(ARGV[1]) then return {r, {}} end
local min = r[#r]
return {r, redis.call('ZRANGEBYSCORE', KEYS[1], min, min, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))}
"#;

/// Members tied at the n-th place a top query reads, at most.
pub const TOP_TIES_MAX: usize = 65_536;

/// An advertiser's top `n`: walks the bucket's sorted set from the top in pages and keeps
/// the members of the given campaigns (`ARGV[3..]`) until it has `n` and the score falls
/// below the n-th one (so ties at the n-th place come along), reading at most `ARGV[2]`
/// members. `ARGV[1]` = n. Answers a flat `member, score, …` list.
const TOP_OF_LUA: &str = r#"
local n = tonumber(ARGV[1])
local scan = tonumber(ARGV[2])
local own = {}
for i = 3, #ARGV do own[ARGV[i]] = true end
local out = {}
local found = 0
local cutoff = nil
local pos = 0
while pos < scan do
  local r = redis.call('ZREVRANGE', KEYS[1], pos, pos + 1023, 'WITHSCORES')
  if #r == 0 then break end
  for i = 1, #r, 2 do
    local score = tonumber(r[i + 1])
    if cutoff ~= nil and score < cutoff then return out end
    local c = string.match(r[i], '^(%d+):')
    if c ~= nil and own[c] then
      out[#out + 1] = r[i]
      out[#out + 1] = r[i + 1]
      found = found + 1
      if found == n then cutoff = score end
    end
  end
  pos = pos + 1024
end
return out
"#;

/// Members one advertiser's top query reads, at most (the bound on [`TOP_OF_LUA`]'s walk).
pub const TOP_OF_SCAN_MAX: usize = 1_000_000;

/// The Redis side's settings, every bound with its unit last.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// One URL (single node) or several (a Redis Cluster's seed nodes).
    pub urls: Vec<String>,
    /// Put in front of every key (tests, or several deployments on one Redis).
    pub key_prefix: String,
    pub flush_interval_ms: u64,
    /// Inner Redis commands per pipeline (round trip), at least 100.
    pub pipeline_commands_max: usize,
    /// Frames one flush round takes from the outbox, at most.
    pub flush_frames_max: usize,
    pub ttl_5m_secs: u64,
    pub ttl_1h_secs: u64,
    pub ttl_1d_secs: u64,
    /// Outbox bytes on disk, at most.
    pub spill_bytes_max: u64,
    pub retry_backoff_min_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// Bound on a connect and on each pipeline / query.
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            urls: Vec::new(),
            key_prefix: String::new(),
            flush_interval_ms: 500,
            pipeline_commands_max: 1000,
            flush_frames_max: 256,
            ttl_5m_secs: 24 * 3600,
            ttl_1h_secs: 7 * 24 * 3600,
            ttl_1d_secs: 90 * 24 * 3600,
            spill_bytes_max: 1 << 30,
            retry_backoff_min_ms: 100,
            retry_backoff_max_ms: 10_000,
            timeout_ms: 5_000,
        }
    }
}

impl RedisConfig {
    /// `redis_url` as configured: one URL or a comma-separated list.
    pub fn parse_urls(s: &str) -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect()
    }

    fn ttl_ms(&self, w: Window) -> u64 {
        match w {
            Window::M5 => self.ttl_5m_secs,
            Window::H1 => self.ttl_1h_secs,
            Window::D1 => self.ttl_1d_secs,
        }
        .saturating_mul(1000)
    }

    /// When a bucket's keys expire: its end plus the window's TTL (as the embedded store
    /// counts retention from the bucket's end).
    pub fn expire_at_ms(&self, w: Window, start: u64) -> u64 {
        start
            .saturating_add(w.len_ms())
            .saturating_add(self.ttl_ms(w))
    }
}

/// `/metrics` and `/readyz` state of the Redis side.
#[derive(Debug, Default)]
pub struct RedisStats {
    pub up: AtomicBool,
    pub flushed_frames: AtomicU64,
    pub skipped_groups: AtomicU64,
    pub script_calls: AtomicU64,
    pub commands: AtomicU64,
    pub round_trips: AtomicU64,
    pub flush_errors: AtomicU64,
    pub late_entries: AtomicU64,
    pub query_errors: AtomicU64,
}

/// A connection to one node or a cluster; cheap to clone (multiplexed).
#[derive(Clone)]
pub enum RedisConn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl RedisConn {
    pub async fn connect(urls: &[String], timeout: Duration) -> anyhow::Result<RedisConn> {
        let fut = async {
            anyhow::Ok(match urls {
                [] => anyhow::bail!("no Redis URL"),
                [one] => {
                    let client = redis::Client::open(one.as_str())
                        .with_context(|| format!("bad Redis URL {one:?}"))?;
                    let cfg = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout))
                        .set_number_of_retries(1);
                    RedisConn::Single(
                        redis::aio::ConnectionManager::new_with_config(client, cfg).await?,
                    )
                }
                many => {
                    let client = redis::cluster::ClusterClient::builder(many.to_vec())
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .retries(2)
                        .build()
                        .context("bad Redis Cluster URLs")?;
                    RedisConn::Cluster(client.get_async_connection().await?)
                }
            })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow::anyhow!("connecting to Redis timed out after {timeout:?}"))?
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    async fn pipe(&mut self, p: &Pipeline, timeout: Duration) -> anyhow::Result<Vec<Value>> {
        let fut = async {
            match self {
                RedisConn::Single(c) => p.query_async::<Vec<Value>>(c).await,
                RedisConn::Cluster(c) => p.query_async::<Vec<Value>>(c).await,
            }
        };
        Ok(tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow::anyhow!("Redis pipeline timed out after {timeout:?}"))??)
    }

    /// The connection as a `ConnectionLike` (scripts, single commands).
    pub fn as_like(&mut self) -> &mut (dyn ConnectionLike + Send) {
        match self {
            RedisConn::Single(c) => c,
            RedisConn::Cluster(c) => c,
        }
    }
}

/// The `dim` part of a key.
pub fn dim_text(d: Dim) -> String {
    match d {
        Dim::All => "all".into(),
        Dim::Country(c) => format!("country={}", String::from_utf8_lossy(&c)),
        Dim::Device(d) => format!("device={}", device_text(d)),
        Dim::Ad(a) => format!("ad={a}"),
        Dim::Publisher(p) => format!("publisher={p}"),
    }
}

fn device_text(d: Device) -> &'static str {
    match d {
        Device::Mobile => "mobile",
        Device::Desktop => "desktop",
        Device::Tablet => "tablet",
        Device::Ctv => "ctv",
        Device::Other => "other",
    }
}

/// Key names, with the configured prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn counter(&self, c: u64, w: Window, start: u64, d: Dim) -> String {
        format!(
            "{}counter:{{{c}}}:{}:{start}:{}",
            self.prefix,
            w.as_str(),
            dim_text(d)
        )
    }
    pub fn users(&self, c: u64, w: Window, start: u64, d: Dim) -> String {
        format!(
            "{}users:{{{c}}}:{}:{start}:{}",
            self.prefix,
            w.as_str(),
            dim_text(d)
        )
    }
    pub fn top(&self, w: Window, start: u64) -> String {
        format!("{}top:{{{}:{start}}}", self.prefix, w.as_str())
    }
    fn marks(&self, tag: &str) -> String {
        format!("{}applied:{{{tag}}}", self.prefix)
    }
    fn scratch(&self, tag: &str) -> String {
        format!("{}scratch:{{{tag}}}", self.prefix)
    }
}

/// One `EVALSHA` of [`APPLY_LUA`]: one hash tag's share of one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub tag: String,
    pub keys: Vec<String>,
    pub args: Vec<Vec<u8>>,
    /// Redis commands the script runs when it applies (for the pipeline bound and the
    /// commands-per-delta figure).
    pub commands: usize,
}

#[derive(Default)]
struct CellSum {
    counters: Counters,
    users: Hll,
}

/// Builds the calls of one validated frame body. Entries whose keys would already be
/// expired at `now_ms` are skipped and counted in the second value.
pub fn calls_for_frame(
    body: &[u8],
    cfg: &RedisConfig,
    keys: &Keys,
    now_ms: u64,
) -> anyhow::Result<(Vec<Call>, u64)> {
    let f = access_delta(body)?;
    let mut cells: BTreeMap<(u64, Window, u64, Dim), CellSum> = BTreeMap::new();
    let mut late = 0u64;
    for e in f.entries.iter() {
        let (key, c) = entry_parts(e)?;
        for &w in key.window.self_and_coarser() {
            let start = w.bucket_start(key.bucket_start);
            if cfg.expire_at_ms(w, start) <= now_ms {
                late += 1;
                continue;
            }
            let cell = cells
                .entry((key.campaign_id, w, start, key.dim))
                .or_default();
            cell.counters.add(&c);
            cell.users.merge_bytes(e.users.as_slice())?;
        }
    }
    let mark_field = format!(
        "{}:{}:{}",
        f.box_id.to_native(),
        f.instance_id.to_native(),
        f.core.to_native()
    );
    let delta_id = format!("{:020}", f.delta_id.to_native());
    let marks_at = now_ms
        .saturating_add(cfg.ttl_ms(Window::D1))
        .saturating_add(Window::D1.len_ms());
    let new_call = |tag: String| Call {
        keys: vec![keys.marks(&tag)],
        args: vec![
            mark_field.clone().into_bytes(),
            delta_id.clone().into_bytes(),
            marks_at.to_string().into_bytes(),
        ],
        commands: 4, // HGET, HSET, PEXPIREAT of the marks + the EVALSHA itself
        tag,
    };
    let mut calls: Vec<Call> = Vec::new();
    let mut tops: BTreeMap<(Window, u64), Call> = BTreeMap::new();
    let mut hll_ops: Vec<(String, u64, Vec<u8>)> = Vec::new();
    let mut h_ops: Vec<(String, [u64; 3], u64)> = Vec::new();
    let mut campaign = None;
    let flush = |campaign: Option<u64>,
                 hll_ops: &mut Vec<(String, u64, Vec<u8>)>,
                 h_ops: &mut Vec<(String, [u64; 3], u64)>,
                 calls: &mut Vec<Call>| {
        let Some(c) = campaign else { return };
        if hll_ops.is_empty() && h_ops.is_empty() {
            return;
        }
        let mut call = new_call(c.to_string());
        for (key, at, sketch) in hll_ops.drain(..) {
            call.keys.push(key);
            call.args.push(b"u".to_vec());
            call.args.push(at.to_string().into_bytes());
            call.args.push(sketch);
            call.commands += 5;
        }
        for (key, v, at) in h_ops.drain(..) {
            call.keys.push(key);
            call.args.push(b"h".to_vec());
            call.args.push(at.to_string().into_bytes());
            for x in v {
                call.args.push(x.to_string().into_bytes());
            }
            call.commands += 1 + v.iter().filter(|&&x| x != 0).count();
        }
        call.keys.push(keys.scratch(&call.tag));
        calls.push(call);
    };
    for ((c, w, start, dim), cell) in &cells {
        if campaign != Some(*c) {
            flush(campaign, &mut hll_ops, &mut h_ops, &mut calls);
            campaign = Some(*c);
        }
        let at = cfg.expire_at_ms(*w, *start);
        if !cell.users.is_empty() {
            if let Some(r) = crate::redis_hll::to_redis_hll(&cell.users.to_bytes())? {
                hll_ops.push((keys.users(*c, *w, *start, *dim), at, r));
            }
        }
        let v = &cell.counters;
        if v.clicks != 0 || v.cost_micros != 0 || v.fraud_clicks != 0 {
            h_ops.push((
                keys.counter(*c, *w, *start, *dim),
                [v.clicks, v.cost_micros, v.fraud_clicks],
                at,
            ));
        }
        if let Dim::Ad(ad) = dim {
            if v.clicks > 0 {
                let call = tops
                    .entry((*w, *start))
                    .or_insert_with(|| new_call(format!("{}:{start}", w.as_str())));
                call.keys.push(keys.top(*w, *start));
                call.args.push(b"z".to_vec());
                call.args.push(at.to_string().into_bytes());
                call.args.push(v.clicks.to_string().into_bytes());
                call.args.push(format!("{c}:{ad}").into_bytes());
                call.commands += 2;
            }
        }
    }
    flush(campaign, &mut hll_ops, &mut h_ops, &mut calls);
    for (_, mut call) in tops {
        call.keys.push(keys.scratch(&call.tag));
        calls.push(call);
    }
    Ok((calls, late))
}

/// Writes calls to Redis: the flusher's and the tests' one entry point.
pub struct Applier {
    pub cfg: RedisConfig,
    pub keys: Keys,
    script: redis::Script,
    pub stats: Arc<RedisStats>,
}

impl Applier {
    pub fn new(cfg: RedisConfig, stats: Arc<RedisStats>) -> Applier {
        Applier {
            keys: Keys {
                prefix: cfg.key_prefix.clone(),
            },
            cfg,
            script: redis::Script::new(APPLY_LUA),
            stats,
        }
    }

    fn pipeline(&self, calls: &[&Call], eval: bool) -> Pipeline {
        let mut p = redis::pipe();
        for c in calls {
            let cmd = p.cmd(if eval { "EVAL" } else { "EVALSHA" });
            cmd.arg(if eval {
                APPLY_LUA
            } else {
                self.script.get_hash()
            })
            .arg(c.keys.len())
            .arg(&c.keys);
            for a in &c.args {
                cmd.arg(a.as_slice());
            }
        }
        p
    }

    /// Runs one pipeline; on `NOSCRIPT` (a node that has not seen the script yet, e.g.
    /// after a restart) sends the same batch as `EVAL`s, which is safe: every call is
    /// idempotent. Returns how many calls applied (the others were already in).
    async fn run(&self, conn: &mut RedisConn, calls: &[&Call]) -> anyhow::Result<u64> {
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
        let r = match conn.pipe(&self.pipeline(calls, false), timeout).await {
            Err(e)
                if e.downcast_ref::<redis::RedisError>().is_some_and(|e| {
                    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                }) =>
            {
                self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
                conn.pipe(&self.pipeline(calls, true), timeout).await?
            }
            r => r?,
        };
        let applied = r.iter().filter(|v| matches!(v, Value::Int(1))).count() as u64;
        self.stats
            .script_calls
            .fetch_add(calls.len() as u64, Ordering::Relaxed);
        self.stats
            .skipped_groups
            .fetch_add(calls.len() as u64 - applied, Ordering::Relaxed);
        self.stats.commands.fetch_add(
            calls.iter().map(|c| c.commands as u64).sum(),
            Ordering::Relaxed,
        );
        Ok(applied)
    }

    /// Applies `calls` in order: single node in pipelines of about
    /// `pipeline_commands_max` commands; cluster, one pipeline per hash tag, concurrently.
    /// An error means some may have applied: retry the same calls.
    pub async fn apply(&self, conn: &mut RedisConn, calls: &[Call]) -> anyhow::Result<u64> {
        let mut batches: Vec<Vec<&Call>> = Vec::new();
        if conn.is_cluster() {
            let mut by_tag: BTreeMap<&str, Vec<&Call>> = BTreeMap::new();
            for c in calls {
                by_tag.entry(&c.tag).or_default().push(c);
            }
            batches.extend(by_tag.into_values());
        } else {
            let mut cur: Vec<&Call> = Vec::new();
            let mut n = 0;
            for c in calls {
                if !cur.is_empty() && n + c.commands > self.cfg.pipeline_commands_max {
                    batches.push(std::mem::take(&mut cur));
                    n = 0;
                }
                n += c.commands;
                cur.push(c);
            }
            if !cur.is_empty() {
                batches.push(cur);
            }
        }
        if conn.is_cluster() {
            let futs = batches.iter().map(|b| {
                let mut conn = conn.clone();
                async move { self.run(&mut conn, b).await }
            });
            let mut applied = 0;
            for r in futures_util::future::join_all(futs).await {
                applied += r?;
            }
            Ok(applied)
        } else {
            let mut applied = 0;
            for b in &batches {
                applied += self.run(conn, b).await?;
            }
            Ok(applied)
        }
    }
}

/// The flusher: every `flush_interval_ms`, takes frames from the outbox, applies them,
/// advances the cursor; on error keeps them and retries with a doubling backoff.
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
    let frames_max = cfg.flush_frames_max;
    let (bodies, cursor) =
        tokio::task::spawn_blocking(move || ob.read_batch(frames_max, 16 << 20)).await??;
    if conn.is_none() {
        *conn = Some(RedisConn::connect(&cfg.urls, Duration::from_millis(cfg.timeout_ms)).await?);
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
    let now = crate::now_ms();
    let mut calls = Vec::new();
    for b in &bodies {
        match calls_for_frame(b, cfg, &applier.keys, now) {
            Ok((c, late)) => {
                calls.extend(c);
                applier
                    .stats
                    .late_entries
                    .fetch_add(late, Ordering::Relaxed);
            }
            // Frames were validated before the store applied them; a bad one here is a
            // disk error: skip it rather than block the outbox forever.
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "redis outbox frame unreadable; skipped")
            }
        }
    }
    if let Err(e) = applier.apply(c, &calls).await {
        if !c.is_cluster() {
            *conn = None; // reconnect: the connection may be in any state after a timeout
        }
        return Err(e);
    }
    applier
        .stats
        .flushed_frames
        .fetch_add(bodies.len() as u64, Ordering::Relaxed);
    let ob = outbox.clone();
    tokio::task::spawn_blocking(move || ob.advance(cursor)).await??;
    Ok(bodies.len() >= frames_max)
}

/// Reads for the query API. Connects on first use (and again after a failed connect), so
/// a controlplane starts while Redis is down.
pub struct RedisQuery {
    urls: Vec<String>,
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
            conn: tokio::sync::Mutex::new(None),
            keys: Keys {
                prefix: cfg.key_prefix.clone(),
            },
            timeout: Duration::from_millis(cfg.timeout_ms),
            stats,
        }
    }

    async fn conn(&self) -> anyhow::Result<RedisConn> {
        let mut g = self.conn.lock().await;
        if let Some(c) = &*g {
            return Ok(c.clone());
        }
        let c = RedisConn::connect(&self.urls, self.timeout)
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

/// The Prometheus text of the Redis side (appended to `/metrics`).
pub fn render_metrics(stats: &RedisStats, outbox: &Outbox, out: &mut String) {
    use std::fmt::Write as _;
    let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
    let lines: [(&str, &str, &str, u64); 12] = [
        ("clickgate_redis_up", "gauge", "1 when the last Redis flush or ping succeeded", stats.up.load(Ordering::Relaxed) as u64),
        ("clickgate_redis_flushed_deltas_total", "counter", "Delta frames written to Redis (or found already there)", g(&stats.flushed_frames)),
        ("clickgate_redis_script_calls_total", "counter", "Exactly-once apply scripts run (one per frame and hash tag)", g(&stats.script_calls)),
        ("clickgate_redis_duplicate_calls_total", "counter", "Apply scripts that found their delta already applied (retries, replays)", g(&stats.skipped_groups)),
        ("clickgate_redis_commands_total", "counter", "Redis commands run by the apply scripts, EVALSHA included", g(&stats.commands)),
        ("clickgate_redis_round_trips_total", "counter", "Pipelines sent to Redis", g(&stats.round_trips)),
        ("clickgate_redis_flush_errors_total", "counter", "Failed flush rounds (the deltas stay in the outbox and are retried)", g(&stats.flush_errors)),
        ("clickgate_redis_late_entries_total", "counter", "Delta entries whose Redis keys had already expired; not written", g(&stats.late_entries)),
        ("clickgate_redis_query_errors_total", "counter", "Queries that Redis failed to answer", g(&stats.query_errors)),
        ("clickgate_redis_outbox_bytes", "gauge", "Bytes of the on-disk Redis outbox", g(&outbox.stats.bytes)),
        ("clickgate_redis_outbox_backlog_bytes", "gauge", "Outbox bytes not yet in Redis", outbox.backlog_bytes()),
        ("clickgate_redis_outbox_dropped_deltas_total", "counter", "Deltas not kept for Redis because the outbox was full or failed (still in the embedded store)", g(&outbox.stats.dropped_deltas)),
    ];
    for (name, kind, help, v) in lines {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
    let since = outbox.stats.pending_since_ms.load(Ordering::Relaxed);
    let lag = if since == 0 {
        0.0
    } else {
        crate::now_ms().saturating_sub(since) as f64 / 1000.0
    };
    let name = "clickgate_redis_flush_lag_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Age of the oldest delta not yet written to Redis (0 when caught up)\n# TYPE {name} gauge\n{name} {lag}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickgate_core::agg::{AggConfig, Aggregator};
    use clickgate_proto::frames::{aligned, encode_delta, frames_from_delta};

    const T0: u64 = 1_764_201_600_000;

    fn body(clicks: &[(u64, u64, &str)]) -> rkyv::util::AlignedVec {
        let mut a = Aggregator::new(AggConfig::default());
        for &(campaign, ad, user) in clicks {
            a.add(
                &crate::store::tests_support::click(campaign, T0 + 1, ad, user, 10),
                true,
                false,
            );
        }
        let mut buf = Vec::new();
        encode_delta(
            &frames_from_delta(3, 4, 1, 9, &a.drain_delta())[0],
            &mut buf,
        )
        .unwrap();
        aligned(&buf[4..])
    }

    #[test]
    fn one_call_per_campaign_and_per_top_bucket_with_rollups() {
        let cfg = RedisConfig::default();
        let keys = Keys {
            prefix: "t:".into(),
        };
        let b = body(&[(1, 10, "a"), (1, 11, "b"), (2, 10, "a")]);
        let (calls, late) = calls_for_frame(&b, &cfg, &keys, T0).unwrap();
        assert_eq!(late, 0);
        let tags: Vec<&str> = calls.iter().map(|c| c.tag.as_str()).collect();
        assert_eq!(
            tags,
            [
                "1",
                "2",
                "5m:1764201600000",
                "1h:1764201600000",
                "1d:1764201600000"
            ]
        );
        let c1 = &calls[0];
        assert_eq!(c1.keys[0], "t:applied:{1}");
        assert_eq!(c1.keys.last().unwrap(), "t:scratch:{1}");
        assert!(c1
            .keys
            .contains(&"t:counter:{1}:1h:1764201600000:ad=11".to_string()));
        assert!(c1
            .keys
            .contains(&"t:users:{1}:5m:1764201600000:country=US".to_string()));
        // 3 windows × 5 dims + 1 more ad dim = 18 counter keys and 18 sketches.
        assert_eq!(c1.keys.len(), 1 + 18 + 18 + 1);
        assert_eq!(c1.args[0], b"3:4:1".to_vec());
        assert_eq!(c1.args[1], b"00000000000000000009".to_vec());
        // Every key of one call carries its tag.
        for c in &calls {
            for k in &c.keys {
                assert!(
                    k.contains(&format!("{{{}}}", c.tag)),
                    "{k} not in slot {}",
                    c.tag
                );
            }
        }
        // Late: past the 5m TTL only the 5m keys go.
        let now = T0 + 2 * 24 * 3600 * 1000;
        let (_, late) = calls_for_frame(&b, &cfg, &keys, now).unwrap();
        assert_eq!(late, 6 + 5); // campaign 1: 6 dims, campaign 2: 5
    }

    #[test]
    fn urls() {
        assert_eq!(
            RedisConfig::parse_urls(" redis://a:1 , redis://b:2,"),
            ["redis://a:1", "redis://b:2"]
        );
        assert!(RedisConfig::parse_urls("").is_empty());
    }
}
