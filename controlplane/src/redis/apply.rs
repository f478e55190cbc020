//! Sending a round's plan to Redis.
//!
//! Round trips: single node, pipelines of about `pipeline_commands_max` commands, a few
//! in flight on the one multiplexed connection; cluster, one pipeline per hash tag (the
//! cluster client refuses cross-slot pipelines), a bounded number concurrently. Within a
//! round no two writes depend on each other's order: each tag has one script, sketches
//! are idempotent.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::{Pipeline, Value};

use super::config::RedisConfig;
use super::conn::RedisConn;
use super::keys::Keys;
use super::metrics::RedisStats;
use super::plan::{plan_round, Call, Plan, SketchOp, SketchWrite};
use super::scripts::{APPLY_LUA, MERGE_LUA};

/// Pipelines in flight at once on a single node.
const SINGLE_IN_FLIGHT: usize = 4;
/// Pipelines (one per hash tag) in flight at once on a cluster.
const CLUSTER_IN_FLIGHT: usize = 64;

/// One pipelined command of a round.
#[derive(Clone, Copy)]
enum Item<'a> {
    Sketch(&'a SketchWrite),
    Call(&'a Call),
}

impl Item<'_> {
    fn tag(&self) -> &str {
        match self {
            Item::Sketch(s) => &s.tag,
            Item::Call(c) => &c.tag,
        }
    }
    fn commands(&self) -> usize {
        match self {
            Item::Sketch(s) => s.commands(),
            Item::Call(c) => c.commands,
        }
    }
}

/// What a pipeline's scripts answered.
#[derive(Default)]
struct Outcome {
    applied: u64,
    /// Tags whose merged share was partly in Redis already (`APPLY_LUA` answered -1).
    mixed: Vec<String>,
}

/// Writes rounds to Redis: the flusher's and the tests' one entry point.
pub struct Applier {
    pub cfg: RedisConfig,
    pub keys: Keys,
    apply: redis::Script,
    merge: redis::Script,
    pub stats: Arc<RedisStats>,
}

impl Applier {
    pub fn new(cfg: RedisConfig, stats: Arc<RedisStats>) -> Applier {
        Applier {
            keys: Keys {
                prefix: cfg.key_prefix.clone(),
            },
            cfg,
            apply: redis::Script::new(APPLY_LUA),
            merge: redis::Script::new(MERGE_LUA),
            stats,
        }
    }

    fn pipeline(&self, items: &[Item<'_>], eval: bool) -> Pipeline {
        let mut p = redis::pipe();
        let script = |p: &mut Pipeline, s: &redis::Script, text: &str| {
            if eval {
                p.cmd("EVAL").arg(text);
            } else {
                p.cmd("EVALSHA").arg(s.get_hash());
            }
        };
        for it in items {
            match it {
                Item::Sketch(s) => match &s.op {
                    SketchOp::Add(elems) => {
                        let c = p.cmd("PFADD").arg(&s.key);
                        for e in elems {
                            c.arg(&e[..]);
                        }
                        p.cmd("PEXPIREAT").arg(&s.key).arg(s.expire_at_ms).ignore();
                        // PFADD's own answer is dropped below by position: keep both.
                    }
                    SketchOp::Merge(hll) => {
                        script(&mut p, &self.merge, MERGE_LUA);
                        p.arg(2)
                            .arg(&s.key)
                            .arg(self.keys.scratch(&s.tag))
                            .arg(&hll[..])
                            .arg(s.expire_at_ms)
                            .ignore();
                    }
                },
                Item::Call(c) => {
                    script(&mut p, &self.apply, APPLY_LUA);
                    p.arg(c.keys.len()).arg(&c.keys);
                    for a in &c.args {
                        p.arg(a.as_slice());
                    }
                }
            }
        }
        p
    }

    /// Runs one pipeline; on `NOSCRIPT` (a node that has not seen a script yet, e.g.
    /// after a restart) sends the same batch with `EVAL`s, which is safe: every item is
    /// idempotent.
    async fn run(&self, mut conn: RedisConn, items: &[Item<'_>]) -> anyhow::Result<Outcome> {
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
        let r = match conn.pipe(&self.pipeline(items, false), timeout).await {
            Err(e)
                if e.downcast_ref::<redis::RedisError>().is_some_and(|e| {
                    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                }) =>
            {
                self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
                conn.pipe(&self.pipeline(items, true), timeout).await?
            }
            r => r?,
        };
        // Replies not ignored: one per PFADD, one per apply script, in order.
        let mut out = Outcome::default();
        let mut replies = r.iter();
        let (mut calls, mut commands) = (0u64, 0u64);
        for it in items {
            commands += it.commands() as u64;
            match it {
                Item::Sketch(s) => {
                    if matches!(s.op, SketchOp::Add(_)) {
                        replies.next();
                    }
                }
                Item::Call(c) => {
                    calls += 1;
                    match replies.next() {
                        Some(Value::Int(1)) => out.applied += 1,
                        Some(Value::Int(-1)) => out.mixed.push(c.tag.clone()),
                        Some(Value::Int(0)) => {}
                        other => anyhow::bail!("unexpected apply script reply {other:?}"),
                    }
                }
            }
        }
        self.stats.script_calls.fetch_add(calls, Ordering::Relaxed);
        self.stats.skipped_groups.fetch_add(
            calls - out.applied - out.mixed.len() as u64,
            Ordering::Relaxed,
        );
        self.stats.commands.fetch_add(commands, Ordering::Relaxed);
        Ok(out)
    }

    /// Sends `items` as bounded pipelines; returns the merged outcome.
    async fn send(&self, conn: &RedisConn, items: Vec<Item<'_>>) -> anyhow::Result<Outcome> {
        let mut batches: Vec<Vec<Item<'_>>> = Vec::new();
        let in_flight = if conn.is_cluster() {
            let mut by_tag: BTreeMap<&str, Vec<Item<'_>>> = BTreeMap::new();
            for it in &items {
                by_tag.entry(it.tag()).or_default().push(*it);
            }
            batches.extend(by_tag.into_values());
            CLUSTER_IN_FLIGHT
        } else {
            let mut cur: Vec<Item<'_>> = Vec::new();
            let mut n = 0;
            for it in items {
                if !cur.is_empty() && n + it.commands() > self.cfg.pipeline_commands_max {
                    batches.push(std::mem::take(&mut cur));
                    n = 0;
                }
                n += it.commands();
                cur.push(it);
            }
            if !cur.is_empty() {
                batches.push(cur);
            }
            SINGLE_IN_FLIGHT
        };
        let mut out = Outcome::default();
        for group in batches.chunks(in_flight) {
            let futs = group.iter().map(|b| self.run(conn.clone(), b));
            for r in futures_util::future::join_all(futs).await {
                let o = r?;
                out.applied += o.applied;
                out.mixed.extend(o.mixed);
            }
        }
        Ok(out)
    }

    /// Applies a round's plan (sketches and scripts). Returns the scripts that applied
    /// and the tags whose share was partly in already. An error means some writes may
    /// have happened: retry the same round.
    async fn apply_plan(&self, conn: &RedisConn, plan: &Plan) -> anyhow::Result<Outcome> {
        let items: Vec<Item<'_>> = plan
            .sketches
            .iter()
            .map(Item::Sketch)
            .chain(plan.calls.iter().map(Item::Call))
            .collect();
        self.send(conn, items).await
    }

    /// Writes a round of frame bodies (outbox order) to Redis exactly once: merged per
    /// key; a tag found partly applied (the round was cut differently before a crash) is
    /// redone frame by frame. Returns how many apply scripts applied (0: all were in).
    /// An error means some writes may have happened: retry the same frames.
    pub async fn apply_round<B: AsRef<[u8]>>(
        &self,
        conn: &RedisConn,
        bodies: &[B],
        now_ms: u64,
    ) -> anyhow::Result<u64> {
        let plan = plan_round(bodies, &self.cfg, &self.keys, now_ms);
        self.note_plan(&plan);
        let mut out = self.apply_plan(conn, &plan).await?;
        if !out.mixed.is_empty() {
            self.stats
                .mixed_groups
                .fetch_add(out.mixed.len() as u64, Ordering::Relaxed);
            let mixed: std::collections::BTreeSet<String> = out.mixed.drain(..).collect();
            // One frame at a time, in outbox order: each frame's share is wholly in or out.
            for b in bodies {
                let one = plan_round(std::slice::from_ref(b), &self.cfg, &self.keys, now_ms);
                let calls: Vec<Item<'_>> = one
                    .calls
                    .iter()
                    .filter(|c| mixed.contains(&c.tag))
                    .map(Item::Call)
                    .collect();
                if calls.is_empty() {
                    continue;
                }
                let o = self.send(conn, calls).await?;
                anyhow::ensure!(o.mixed.is_empty(), "a single frame applied partly");
                out.applied += o.applied;
            }
        }
        Ok(out.applied)
    }

    fn note_plan(&self, plan: &Plan) {
        let s = &self.stats;
        let st = &plan.stats;
        s.late_entries.fetch_add(st.late, Ordering::Relaxed);
        s.cell_updates.fetch_add(st.cell_updates, Ordering::Relaxed);
        s.cells_written.fetch_add(st.cells, Ordering::Relaxed);
        s.pfadd_registers
            .fetch_add(st.pfadd_registers, Ordering::Relaxed);
        s.merged_sketches
            .fetch_add(st.merged_sketches, Ordering::Relaxed);
        s.duplicate_frames
            .fetch_add(st.duplicate_frames, Ordering::Relaxed);
    }
}
