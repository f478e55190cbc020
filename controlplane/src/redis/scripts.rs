//! The Lua scripts. A script runs whole (atomically) on the node of its keys' slot.

/// Applies one hash tag's share of a flush round (the merged deltas of several frames,
/// possibly of several `(box, instance, core)` runs) exactly once.
///
/// KEYS[1] the marks hash, KEYS[2..] targets. ARGV[1] the marks' PEXPIREAT, ARGV[2] the
/// number `n` of runs, then per run: mark field, first and last delta id of the run's
/// frames in this share (20 digits: compared as strings); then per target: op (`h`
/// counters, `z` top), PEXPIREAT, args.
///
/// Returns 1 when applied, 0 when every run's mark is already at its last id (a retry or
/// a replay), -1 when some frames of the share are in and others are not (a round cut
/// differently before a crash): nothing is written and the caller applies that tag's
/// frames one by one, each of which is wholly in or out.
pub const APPLY_LUA: &str = r#"
local n = tonumber(ARGV[2])
local old, new = 0, 0
for i = 0, n - 1 do
  local last = redis.call('HGET', KEYS[1], ARGV[3 + 3 * i])
  if last and last >= ARGV[5 + 3 * i] then old = old + 1
  elseif (not last) or last < ARGV[4 + 3 * i] then new = new + 1 end
end
if old == n then return 0 end
if new ~= n then return -1 end
local a = 3 + 3 * n
for k = 2, #KEYS do
  local key, op, at = KEYS[k], ARGV[a], ARGV[a + 1]
  if op == 'h' then
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
for i = 0, n - 1 do redis.call('HSET', KEYS[1], ARGV[3 + 3 * i], ARGV[5 + 3 * i]) end
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
return 1
"#;

/// Merges a whole sketch (a Redis HLL string) into a key: `SET` when the key is new,
/// else through a scratch key in the same slot and `PFMERGE`, atomically (so two boxes
/// sharing the scratch key name never see each other's). Idempotent.
/// KEYS[1] the sketch, KEYS[2] scratch; ARGV[1] the HLL string, ARGV[2] PEXPIREAT.
pub const MERGE_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[2], ARGV[1])
  redis.call('PFMERGE', KEYS[1], KEYS[2])
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
"#;

/// Top-N with the embedded store's tie order: the first `n` by score, plus every member
/// tied with the n-th (at most `ARGV[2]`), sorted by the caller.
pub const TOP_LUA: &str = r#"
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
pub const TOP_OF_LUA: &str = r#"
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

/// The scripts the flusher runs with `EVALSHA` (a test or an operator can preload them).
pub const FLUSH_SCRIPTS: [&str; 2] = [APPLY_LUA, MERGE_LUA];
