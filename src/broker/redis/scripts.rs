//! The Lua scripts: each one is a step that must be atomic.

use redis::Script;

/// Extends a member's claim on entries it still owns (RELIABILITY.md P2).
/// A bare `XCLAIM … 0` would steal entries another member reclaimed, so
/// ownership is checked first, in the same atomic step.
pub(super) const HEARTBEAT_LUA: &str = r#"
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #p == 0 or p[1][2] ~= ARGV[2] then
    table.insert(lost, id)
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  end
end
return lost
"#;

/// `XACKDEL … ACKED` for servers without it (Redis 7.0–8.0, Valkey):
/// KEYS = stream, attempts hash; ARGV = group, n, n ids whose attempt counts
/// to forget, then the ids to ack. Each id is acked; one this call acked is
/// deleted unless a group still needs it (pending there, or not yet
/// delivered to it). Returns per id what `XACKDEL` does: -1 not pending
/// (nothing done), 1 acked and deleted, 2 acked and kept. Ids compare as two
/// decimal numbers, exactly (by length, then text).
pub(super) const ACK_DELETE_LUA: &str = r#"
local function num_gt(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local function after(a, b)
  if not b then return true end
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then return true end
  if am ~= bm then return num_gt(am, bm) end
  return num_gt(as, bs)
end
local groups = {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  groups[#groups + 1] = {name, last}
end
local nforget = tonumber(ARGV[2])
if nforget > 0 then
  redis.call('HDEL', KEYS[2], unpack(ARGV, 3, 2 + nforget))
end
local out = {}
for i = 3 + nforget, #ARGV do
  local id = ARGV[i]
  local r = -1
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    r = 1
    for _, g in ipairs(groups) do
      if after(id, g[2]) or #redis.call('XPENDING', KEYS[1], g[1], id, id, 1) > 0 then
        r = 2
        break
      end
    end
    if r == 1 then redis.call('XDEL', KEYS[1], id) end
  end
  out[#out + 1] = r
end
return out
"#;

/// Records failed attempts, their last errors and due times, atomically.
/// ARGV holds quadruples `id, attempts, delay_ms, error` (`error` empty when
/// there is none); the attempts hash keeps the count under `id` and the
/// error under `id:error`. Each due time is the server's `TIME` plus the
/// delay, so the writer's wall clock plays no part (a script may call
/// `TIME` before writing: since 7.0 scripts replicate their effects).
/// Returns the server time used, in ms.
pub(super) const SCHEDULE_RETRIES_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #ARGV, 4 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  if ARGV[i + 3] ~= '' then
    redis.call('HSET', KEYS[1], ARGV[i] .. ':error', ARGV[i + 3])
  else
    redis.call('HDEL', KEYS[1], ARGV[i] .. ':error')
  end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[i + 2]), ARGV[i])
end
return now
"#;

/// Moves the due time of entries that wait for a retry to now, by the
/// server's `TIME` (the clock the schedule is written and read with). An
/// id not in the schedule is left out. Returns how many were moved.
pub(super) const RETRY_NOW_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local scores = redis.call('ZMSCORE', KEYS[1], unpack(ARGV))
local moved = 0
for i, score in ipairs(scores) do
  if score then
    redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i])
    moved = moved + 1
  end
end
return moved
"#;

/// Takes entries whose retry time has come, by the server's `TIME` (the
/// clock their due times were written with), out of the schedule and
/// claims them for a member, atomically. Stale schedule items (no longer
/// pending) are dropped. Returns `{id, attempts, fields}`, or `{id,
/// attempts}` when the payload was trimmed away (XCLAIM removes such ids
/// from the pending list).
pub(super) const CLAIM_DUE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[2], id)
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #p > 0 then
    local attempts = redis.call('HGET', KEYS[3], id) or '0'
    local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
    if #c > 0 and c[1] and c[1][2] then
      table.insert(out, {id, attempts, c[1][2]})
    else
      table.insert(out, {id, attempts})
    end
  end
end
return out
"#;

/// Writes dead letters and acks each original only if its own letter was
/// written (a MULTI would ack even when the XADD fails at run time, for
/// example on a wrong key type). Returns `{id, error}` for each letter that
/// could not be written; those originals stay pending.
pub(super) const DEAD_LETTER_LUA: &str = r#"
local failed = {}
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local id = ARGV[i]
  local nfields = tonumber(ARGV[i + 1])
  i = i + 2
  local args = {'XADD', KEYS[2], '*'}
  for _ = 1, nfields * 2 do
    args[#args + 1] = ARGV[i]
    i = i + 1
  end
  local r = redis.pcall(unpack(args))
  if type(r) == 'table' and r.err then
    failed[#failed + 1] = {id, r.err}
  else
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('HDEL', KEYS[3], id, id .. ':error')
    redis.call('ZREM', KEYS[4], id)
  end
end
return failed
"#;

/// Removes consumers of a group that have nothing pending, have been idle
/// longer than ARGV[2] ms, and whose member-name lease (ARGV[3] .. name) is
/// not held by a live process. Checked and deleted in one atomic step, so
/// `DELCONSUMER` never drops a pending entry (P11).
pub(super) const REMOVE_IDLE_CONSUMERS_LUA: &str = r#"
local removed = {}
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, c in ipairs(consumers) do
  local name, pending, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name and pending == 0 and idle > tonumber(ARGV[2])
     and redis.call('EXISTS', ARGV[3] .. name) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed[#removed + 1] = name
  end
end
return removed
"#;

/// Takes or renews leases: `PEXPIRE` when already ours (the common case, a
/// renewal: looked at first), `SET NX` when free.
pub(super) const LEASE_ACQUIRE_LUA: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    out[i] = 1
  elseif not holder and redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"#;

/// Deletes leases only where they still hold our token.
pub(super) const LEASE_RELEASE_LUA: &str = r#"
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
  end
end
return 1
"#;

/// Keeps the newest value of a field (see `crate::latest`): writes
/// `KEYS[1][ARGV[1]] = ARGV[4]` and `KEYS[2][ARGV[1]] = "ARGV[2]:ARGV[3]"`
/// only if the version `(ARGV[2], ARGV[3])` is greater than the stored one,
/// comparing the time first, then the tiebreak, as numbers (both below
/// 2^53, so Lua's doubles hold them exactly). Returns 1 (written), 0 (the
/// same version is stored) or -1 (a newer version is stored).
pub(super) const LATEST_PUT_LUA: &str = r#"
local at = tonumber(ARGV[2])
local tb = tonumber(ARGV[3])
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if cur then
  local sep = string.find(cur, ':', 1, true)
  if sep then
    local cur_at = tonumber(string.sub(cur, 1, sep - 1))
    local cur_tb = tonumber(string.sub(cur, sep + 1))
    if cur_at and cur_tb then
      if at < cur_at or (at == cur_at and tb < cur_tb) then
        return -1
      end
      if at == cur_at and tb == cur_tb then
        return 0
      end
    end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
return 1
"#;

/// Removes a consumer without dropping what it holds: its pending entries
/// are first claimed by ARGV[3] (the orphans consumer) keeping their idle
/// time and delivery count, so the reclaimer hands them on; then
/// `DELCONSUMER`. KEYS = stream; ARGV = group, consumer, orphans. Returns
/// how many entries moved.
pub(super) const REMOVE_CONSUMER_LUA: &str = r#"
local moved = 0
while true do
  local rows = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])
  if #rows == 0 then break end
  for _, r in ipairs(rows) do
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, r[1], 'IDLE', r[3], 'RETRYCOUNT', r[4], 'FORCE', 'JUSTID')
    moved = moved + 1
  end
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return moved
"#;

pub(super) struct Scripts {
    pub(super) ack_delete: Script,
    pub(super) heartbeat: Script,
    pub(super) remove_idle_consumers: Script,
    pub(super) dead_letter: Script,
    pub(super) claim_due: Script,
    pub(super) schedule_retries: Script,
    pub(super) retry_now: Script,
    pub(super) remove_consumer: Script,
    pub(super) lease_acquire: Script,
    pub(super) lease_release: Script,
    pub(super) latest_put: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            ack_delete: Script::new(ACK_DELETE_LUA),
            heartbeat: Script::new(HEARTBEAT_LUA),
            dead_letter: Script::new(DEAD_LETTER_LUA),
            remove_idle_consumers: Script::new(REMOVE_IDLE_CONSUMERS_LUA),
            claim_due: Script::new(CLAIM_DUE_LUA),
            schedule_retries: Script::new(SCHEDULE_RETRIES_LUA),
            retry_now: Script::new(RETRY_NOW_LUA),
            remove_consumer: Script::new(REMOVE_CONSUMER_LUA),
            lease_acquire: Script::new(LEASE_ACQUIRE_LUA),
            lease_release: Script::new(LEASE_RELEASE_LUA),
            latest_put: Script::new(LATEST_PUT_LUA),
        }
    }
}
