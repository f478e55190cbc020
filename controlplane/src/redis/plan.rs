//! Turning a flush round's frames into Redis writes, merged per key.
//!
//! A round's frames (possibly of several `(box, instance, core)` runs) are summed per
//! cell `(campaign, window, bucket, dim)` — a 5m entry also goes to its 1h and 1d cells,
//! as the embedded store rolls up — so a key busy in every frame is written once per
//! round, not once per frame. What Redis gets:
//!
//! - **Sketches, idempotent, outside any script**: a register-wise max can be repeated
//!   at will, so it needs no mark. A cell's merged sketch with few registers becomes one
//!   `PFADD` of crafted elements (`hll::pfadd_element`: Redis touches only those
//!   registers); a larger one one `PFMERGE` of the whole sketch (`MERGE_LUA`).
//! - **Counters and top-N, exactly once**: one `APPLY_LUA` per hash tag (the campaign,
//!   or the top-N bucket) carrying every run's first and last delta id in the round.
//!
//! A frame whose `(run, delta id)` is at or below one already taken this round is a
//! duplicate (the outbox can hold a frame twice after a crash between its commit and
//! the WAL's, see `outbox`) and is left out, as the per-tag mark would skip it.

use std::collections::{BTreeMap, HashMap};

use clickgate_core::agg::{Counters, Dim};
use clickgate_core::hll::Hll;
use clickgate_core::window::Window;
use clickgate_proto::frames::{ArchivedDeltaFrame, FRAMES_VERSION};

use super::config::RedisConfig;
use super::hll::{for_each_register, pfadd_element, to_redis_hll};
use super::keys::Keys;

/// One dataplane core's process run: `(box, instance, core)`; its frames' delta ids rise.
pub type Run = (u64, u64, u32);

/// One `EVALSHA` of `APPLY_LUA`: one hash tag's share of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub tag: String,
    pub keys: Vec<String>,
    pub args: Vec<Vec<u8>>,
    /// Redis commands the script runs when it applies, the `EVALSHA` included (for the
    /// pipeline bound and the commands figure).
    pub commands: usize,
}

/// How a sketch reaches its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SketchOp {
    /// `PFADD` of these 8-byte elements, one per non-zero register.
    Add(Vec<[u8; 8]>),
    /// `MERGE_LUA` of this Redis HLL string.
    Merge(Vec<u8>),
}

/// One idempotent sketch write (and its key's `PEXPIREAT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SketchWrite {
    pub tag: String,
    pub key: String,
    pub expire_at_ms: u64,
    pub op: SketchOp,
}

impl SketchWrite {
    /// Redis commands it costs: `PFADD` + `PEXPIREAT`, or the script and its five.
    pub fn commands(&self) -> usize {
        match self.op {
            SketchOp::Add(_) => 2,
            SketchOp::Merge(_) => 6,
        }
    }
}

/// What a round held and what it became.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    pub frames: u64,
    /// Frames left out: already taken this round (outbox duplicates).
    pub duplicate_frames: u64,
    /// Frames left out: unreadable (a disk error; logged).
    pub bad_frames: u64,
    /// 5m entries read.
    pub entries: u64,
    /// Cell updates skipped because their keys would already have expired.
    pub late: u64,
    /// Cell updates before merging: each entry's 5m, 1h and 1d cell.
    pub cell_updates: u64,
    /// Distinct cells written (after merging).
    pub cells: u64,
    /// Sketch registers sent with `PFADD`.
    pub pfadd_registers: u64,
    /// Sketches sent whole (`PFMERGE`).
    pub merged_sketches: u64,
}

/// A round's writes.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub sketches: Vec<SketchWrite>,
    pub calls: Vec<Call>,
    pub stats: PlanStats,
}

impl Plan {
    pub fn commands(&self) -> usize {
        self.sketches.iter().map(|s| s.commands()).sum::<usize>()
            + self.calls.iter().map(|c| c.commands).sum::<usize>()
    }
}

#[derive(Default)]
struct Cell {
    counters: Counters,
    users: Hll,
}

/// First and last delta id of each run that wrote to one tag this round.
#[derive(Default)]
struct Runs(BTreeMap<Run, (u64, u64)>);

impl Runs {
    fn note(&mut self, run: Run, id: u64) {
        let e = self.0.entry(run).or_insert((id, id));
        e.0 = e.0.min(id);
        e.1 = e.1.max(id);
    }
}

type CellKey = (u64, Window, u64, Dim);

/// Builds the plan of a round's frames (validated frame bodies, outbox order). Entries
/// whose keys would already be expired at `now_ms` are not written (`stats.late`); a
/// frame that cannot be read is left out whole (`stats.bad_frames`, logged).
pub fn plan_round<B: AsRef<[u8]>>(
    bodies: &[B],
    cfg: &RedisConfig,
    keys: &Keys,
    now_ms: u64,
) -> Plan {
    let mut skip = vec![false; bodies.len()];
    loop {
        match try_plan(bodies, &skip, cfg, keys, now_ms) {
            Ok(p) => return p,
            Err((i, e)) => {
                tracing::error!(error = %format!("{e:#}"), "redis outbox frame unreadable; skipped");
                skip[i] = true;
            }
        }
    }
}

fn access(body: &[u8]) -> anyhow::Result<&ArchivedDeltaFrame> {
    let f = rkyv::access::<ArchivedDeltaFrame, rkyv::rancor::Error>(body)
        .map_err(|e| anyhow::anyhow!("invalid delta frame: {e}"))?;
    anyhow::ensure!(
        f.version.to_native() == FRAMES_VERSION,
        "delta frame version {}",
        f.version.to_native()
    );
    Ok(f)
}

fn try_plan<B: AsRef<[u8]>>(
    bodies: &[B],
    skip: &[bool],
    cfg: &RedisConfig,
    keys: &Keys,
    now_ms: u64,
) -> Result<Plan, (usize, anyhow::Error)> {
    let mut stats = PlanStats {
        bad_frames: skip.iter().filter(|&&s| s).count() as u64,
        ..PlanStats::default()
    };
    let mut cells: BTreeMap<CellKey, Cell> = BTreeMap::new();
    let mut campaigns: BTreeMap<u64, Runs> = BTreeMap::new();
    let mut tops: BTreeMap<(Window, u64), Runs> = BTreeMap::new();
    let mut taken: HashMap<Run, u64> = HashMap::new();
    for (i, body) in bodies.iter().enumerate() {
        if skip[i] {
            continue;
        }
        let f = access(body.as_ref()).map_err(|e| (i, e))?;
        stats.frames += 1;
        let run: Run = (
            f.box_id.to_native(),
            f.instance_id.to_native(),
            f.core.to_native(),
        );
        let id = f.delta_id.to_native();
        match taken.get(&run) {
            Some(&last) if id <= last => {
                stats.duplicate_frames += 1;
                continue;
            }
            _ => {
                taken.insert(run, id);
            }
        }
        let mut last_campaign: Option<u64> = None;
        for e in f.entries.iter() {
            let bad = |what: String| (i, anyhow::anyhow!("{what}"));
            let window =
                Window::from_u8(e.window).ok_or_else(|| bad(format!("bad window {}", e.window)))?;
            let (kind, value) = (e.dim_kind, e.dim_value.to_native());
            let dim = Dim::from_parts(kind, value)
                .ok_or_else(|| bad(format!("bad dimension {kind}:{value}")))?;
            let c = Counters {
                clicks: e.clicks.to_native(),
                cost_micros: e.cost_micros.to_native(),
                fraud_clicks: e.fraud_clicks.to_native(),
            };
            let campaign = e.campaign_id.to_native();
            stats.entries += 1;
            for &w in window.self_and_coarser() {
                let start = w.bucket_start(e.bucket_start.to_native());
                if cfg.expire_at_ms(w, start) <= now_ms {
                    stats.late += 1;
                    continue;
                }
                stats.cell_updates += 1;
                let cell = cells.entry((campaign, w, start, dim)).or_default();
                cell.counters.add(&c);
                cell.users
                    .merge_bytes(e.users.as_slice())
                    .map_err(|err| bad(format!("bad sketch: {err}")))?;
                if last_campaign != Some(campaign) {
                    campaigns.entry(campaign).or_default().note(run, id);
                    last_campaign = Some(campaign);
                }
                if matches!(dim, Dim::Ad(_)) && c.clicks > 0 {
                    tops.entry((w, start)).or_default().note(run, id);
                }
            }
        }
    }

    let marks_at = cfg.marks_expire_at_ms(now_ms);
    let new_call = |tag: String, runs: &Runs| {
        let mut args = vec![
            marks_at.to_string().into_bytes(),
            runs.0.len().to_string().into_bytes(),
        ];
        for (&(b, inst, core), &(first, last)) in &runs.0 {
            args.push(format!("{b}:{inst}:{core}").into_bytes());
            args.push(format!("{first:020}").into_bytes());
            args.push(format!("{last:020}").into_bytes());
        }
        Call {
            keys: vec![keys.marks(&tag)],
            args,
            // EVALSHA, HGET and HSET per run, the marks' PEXPIREAT.
            commands: 2 + 2 * runs.0.len(),
            tag,
        }
    };
    let mut plan = Plan::default();
    let mut top_calls: BTreeMap<(Window, u64), Call> = BTreeMap::new();
    let mut call: Option<(u64, Call)> = None;
    let mut wire = Vec::new();
    for ((c, w, start, dim), cell) in &cells {
        if call.as_ref().map(|x| x.0) != Some(*c) {
            if let Some((_, done)) = call.take() {
                if done.keys.len() > 1 {
                    plan.calls.push(done);
                }
            }
            let runs = &campaigns[c];
            call = Some((*c, new_call(c.to_string(), runs)));
        }
        let (_, cur) = call.as_mut().expect("set above");
        stats.cells += 1;
        let at = cfg.expire_at_ms(*w, *start);
        wire.clear();
        cell.users.write_to(&mut wire);
        let mut elems = Vec::new();
        let n = for_each_register(&wire, |idx, rank| {
            if elems.len() < cfg.pfadd_registers_max {
                elems.push(pfadd_element(idx, rank));
            }
        })
        .expect("a sketch we built encodes validly");
        if n > 0 {
            let op = if n <= cfg.pfadd_registers_max {
                stats.pfadd_registers += n as u64;
                SketchOp::Add(elems)
            } else {
                stats.merged_sketches += 1;
                SketchOp::Merge(
                    to_redis_hll(&wire)
                        .expect("a sketch we built encodes validly")
                        .expect("not empty"),
                )
            };
            plan.sketches.push(SketchWrite {
                tag: cur.tag.clone(),
                key: keys.users(*c, *w, *start, *dim),
                expire_at_ms: at,
                op,
            });
        }
        let v = &cell.counters;
        if v.clicks != 0 || v.cost_micros != 0 || v.fraud_clicks != 0 {
            cur.keys.push(keys.counter(*c, *w, *start, *dim));
            cur.args.push(b"h".to_vec());
            cur.args.push(at.to_string().into_bytes());
            for x in [v.clicks, v.cost_micros, v.fraud_clicks] {
                cur.args.push(x.to_string().into_bytes());
            }
            cur.commands += 1 + [v.clicks, v.cost_micros, v.fraud_clicks]
                .iter()
                .filter(|&&x| x != 0)
                .count();
        }
        if let Dim::Ad(ad) = dim {
            if v.clicks > 0 {
                let t = top_calls.entry((*w, *start)).or_insert_with(|| {
                    new_call(format!("{}:{start}", w.as_str()), &tops[&(*w, *start)])
                });
                t.keys.push(keys.top(*w, *start));
                t.args.push(b"z".to_vec());
                t.args.push(at.to_string().into_bytes());
                t.args.push(v.clicks.to_string().into_bytes());
                t.args.push(format!("{c}:{ad}").into_bytes());
                t.commands += 2;
            }
        }
    }
    if let Some((_, done)) = call.take() {
        if done.keys.len() > 1 {
            plan.calls.push(done);
        }
    }
    plan.calls.extend(top_calls.into_values());
    plan.stats = stats;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickgate_core::agg::{AggConfig, Aggregator};
    use clickgate_proto::frames::{aligned, encode_delta, frames_from_delta};

    const T0: u64 = 1_764_201_600_000;

    fn body(run: Run, id: u64, clicks: &[(u64, u64, &str)]) -> rkyv::util::AlignedVec {
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
            &frames_from_delta(run.0, run.1, run.2, id, &a.drain_delta())[0],
            &mut buf,
        )
        .unwrap();
        aligned(&buf[4..])
    }

    fn keys() -> Keys {
        Keys {
            prefix: "t:".into(),
        }
    }

    #[test]
    fn one_call_per_campaign_and_per_top_bucket_with_rollups() {
        let cfg = RedisConfig::default();
        let b = body((3, 4, 1), 9, &[(1, 10, "a"), (1, 11, "b"), (2, 10, "a")]);
        let plan = plan_round(&[&b[..]], &cfg, &keys(), T0);
        assert_eq!(plan.stats.late, 0);
        let tags: Vec<&str> = plan.calls.iter().map(|c| c.tag.as_str()).collect();
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
        let c1 = &plan.calls[0];
        assert_eq!(c1.keys[0], "t:applied:{1}");
        assert!(c1
            .keys
            .contains(&"t:counter:{1}:1h:1764201600000:ad=11".to_string()));
        // 3 windows × 5 dims + 1 more ad dim = 18 counter keys.
        assert_eq!(c1.keys.len(), 1 + 18);
        assert_eq!(c1.args[1], b"1".to_vec());
        assert_eq!(c1.args[2], b"3:4:1".to_vec());
        assert_eq!(c1.args[3], b"00000000000000000009".to_vec());
        assert_eq!(c1.args[4], b"00000000000000000009".to_vec());
        // Sketches: one per cell, small ones as PFADD, all in their campaign's slot.
        assert_eq!(plan.sketches.len(), 18 + 15);
        let us = plan
            .sketches
            .iter()
            .find(|s| s.key == "t:users:{1}:5m:1764201600000:country=US")
            .unwrap();
        assert!(matches!(&us.op, SketchOp::Add(e) if e.len() == 2), "{us:?}");
        for s in &plan.sketches {
            assert!(s.key.contains(&format!("{{{}}}", s.tag)), "{}", s.key);
        }
        for c in &plan.calls {
            for k in &c.keys {
                assert!(
                    k.contains(&format!("{{{}}}", c.tag)),
                    "{k} not in slot {}",
                    c.tag
                );
            }
        }
        // Late: past the 5m TTL only the 5m cells go.
        let now = T0 + 2 * 24 * 3600 * 1000;
        let plan = plan_round(&[&b[..]], &cfg, &keys(), now);
        assert_eq!(plan.stats.late, 6 + 5); // campaign 1: 6 entries, campaign 2: 5
    }

    /// Campaign 1's `all` counters in the 5m bucket: `(clicks, cost)`.
    fn all_5m(plan: &Plan) -> Vec<Vec<u8>> {
        let c = &plan.calls[0];
        let i = c
            .keys
            .iter()
            .position(|k| k == "t:counter:{1}:5m:1764201600000:all")
            .unwrap();
        // ARGV: marks_at, n, 3 per run, then 5 per counter key (op, at, 3 values).
        let runs = String::from_utf8(c.args[1].clone())
            .unwrap()
            .parse::<usize>()
            .unwrap();
        let at = 2 + 3 * runs + 5 * (i - 1);
        c.args[at..at + 5].to_vec()
    }

    #[test]
    fn a_round_merges_runs_per_key_and_leaves_out_duplicates() {
        let cfg = RedisConfig::default();
        let a1 = body((1, 1, 0), 5, &[(1, 10, "a"), (1, 10, "b")]);
        let a2 = body((1, 1, 0), 6, &[(1, 10, "c")]);
        let b1 = body((1, 1, 1), 40, &[(1, 11, "d")]);
        // The outbox can repeat a frame (crash between its commit and the WAL's).
        let round: Vec<&[u8]> = vec![&a1, &b1, &a2, &a1];
        let plan = plan_round(&round, &cfg, &keys(), T0);
        assert_eq!(plan.stats.frames, 4);
        assert_eq!(plan.stats.duplicate_frames, 1);
        assert_eq!(plan.calls.iter().filter(|c| c.tag == "1").count(), 1);
        let c = &plan.calls[0];
        assert_eq!(c.args[1], b"2".to_vec());
        assert_eq!(c.args[2], b"1:1:0".to_vec());
        assert_eq!(c.args[3], b"00000000000000000005".to_vec());
        assert_eq!(c.args[4], b"00000000000000000006".to_vec());
        assert_eq!(c.args[5], b"1:1:1".to_vec());
        assert_eq!(c.args[6], b"00000000000000000040".to_vec());
        assert_eq!(c.args[7], b"00000000000000000040".to_vec());
        assert_eq!(all_5m(&plan)[2], b"4".to_vec(), "4 clicks summed, a1 once");
        let users = plan
            .sketches
            .iter()
            .find(|s| s.key == "t:users:{1}:1d:1764201600000:all")
            .unwrap();
        assert!(matches!(&users.op, SketchOp::Add(e) if e.len() == 4));
        // 6 cells per window (all, country, device, 2 ads, publisher) = 18 keys written
        // once, from 3 frames × 5 or 6 entries × 3 windows.
        assert_eq!(plan.stats.cells, 18);
        assert_eq!(plan.stats.cell_updates, 3 * (5 + 5 + 5));
    }

    #[test]
    fn big_sketches_go_whole_and_bad_frames_are_left_out() {
        let cfg = RedisConfig {
            pfadd_registers_max: 1,
            ..RedisConfig::default()
        };
        let a = body((1, 1, 0), 5, &[(1, 10, "a"), (1, 10, "b")]);
        let plan = plan_round(&[&a[..], b"garbage"], &cfg, &keys(), T0);
        assert_eq!(plan.stats.bad_frames, 1);
        assert_eq!(plan.stats.frames, 1);
        for s in &plan.sketches {
            let SketchOp::Merge(r) = &s.op else {
                panic!("{s:?}")
            };
            assert_eq!(&r[..4], b"HYLL");
        }
        assert_eq!(plan.stats.merged_sketches, plan.sketches.len() as u64);
    }
}
