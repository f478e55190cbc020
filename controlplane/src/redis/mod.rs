//! The Redis real-time store: the flusher that writes applied deltas to Redis, exactly
//! once, and the reads the query API makes there when `redis_url` is set.
//!
//! Keys (`{…}` is the Redis Cluster hash tag, so one campaign's keys share a slot):
//! - `counter:{campaign}:{window}:{bucket_start}:{dim}` — hash `clicks`, `cost_micros`,
//!   `fraud_clicks`; `dim` is `all`, `country=US`, `device=mobile`, `ad=678`,
//!   `publisher=42`.
//! - `users:{campaign}:{window}:{bucket_start}:{dim}` — a Redis HyperLogLog, the union
//!   of every box's and core's sketch (see [`hll`]).
//! - `top:{window:bucket_start}` — sorted set of `campaign:ad` by billable clicks.
//! - `owners:{owners}` — hash campaign → advertiser, shared by every box (see [`owners`]).
//! - `applied:{tag}` — hash `box:instance:core` → last delta id applied to that tag.
//! - every key gets `PEXPIREAT bucket end + ttl(window)`; marks live as long as the
//!   longest of them. An optional `redis_key_prefix` goes in front of all of them.
//!
//! Modules, in the order data flows:
//! - [`outbox`]: the frames the store applied, on disk, until Redis has them.
//! - [`plan`]: a flush round's frames merged per key into idempotent sketch writes and
//!   one exactly-once script call per hash tag.
//! - [`apply`]: pipelines to one node or a cluster; partly applied tags redone per frame.
//! - [`flusher`]: the task that runs rounds, retries, backs off.
//! - [`scripts`], [`keys`], [`hll`] (our sketches as Redis HLL strings and `PFADD`
//!   elements), [`conn`], [`config`], [`query`] (the query API's reads), [`metrics`].
//!
//! Exactly once: a tag's script applies only if every run's mark is below the first
//! delta id the round holds for it, then sets the marks to the last, atomically (a Lua
//! script runs whole). Frames of one `(box, instance, core)` reach Redis in delta id
//! order (the outbox keeps the store's apply order, rounds run one after another, a
//! failed round is retried whole), so a retried or replayed round is skipped, never
//! added twice. Sketch writes are register-wise maxima: repeating them changes nothing.
//!
//! The module is `redis_store` (its path, `redis/`, avoids a clash with the `redis` crate).

pub mod apply;
pub mod config;
pub mod conn;
pub mod flusher;
pub mod hll;
pub mod keys;
pub mod metrics;
pub mod outbox;
pub mod owners;
pub mod plan;
pub mod query;
pub mod scripts;

pub use apply::Applier;
pub use config::RedisConfig;
pub use conn::RedisConn;
pub use flusher::flusher;
pub use keys::{dim_text, Keys};
pub use metrics::{flush_lag_seconds, render_metrics, RedisStats};
pub use plan::{plan_round, Call, Plan, PlanStats, SketchOp, SketchWrite};
pub use query::{RedisQuery, RedisSide};
pub use scripts::{APPLY_LUA, FLUSH_SCRIPTS, MERGE_LUA, TOP_TIES_MAX};
