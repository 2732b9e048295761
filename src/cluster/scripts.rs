//! The Redis keys and Lua scripts the instances share.
//!
//! Every count lives in a key named after the gateway key's id (never the
//! key itself): a script reads and changes it in one step, so instances
//! racing on a key cannot both take its last request. Scripts reach keys
//! other than their `KEYS` (instance liveness), so a Redis Cluster is not
//! supported; one Redis or Valkey (or a primary with replicas) is.

use std::sync::LazyLock;

use redis::Script;

use crate::keys::KeyId;

/// The channel revocations, token totals and address blocks go out on.
pub const EVENTS: &str = "agw:events";
/// The set of key ids revoked with `keys revoke --shared`.
pub const REVOKED: &str = "agw:revoked";

/// The rate window of a key: its count, expiring with the window. The
/// period is part of the name, so a changed limit starts a fresh window.
pub fn rate_key(id: &str, period_ms: u64) -> String {
    format!("agw:rate:{id}:{period_ms}")
}

/// A key's concurrency slots: a hash of instance id to slots held.
pub fn slots_key(id: &str) -> String {
    format!("agw:slots:{id}")
}

/// A key's token window: tokens used, expiring with the window.
pub fn tokens_key(id: &str, period_s: u64) -> String {
    format!("agw:tokens:{id}:{period_s}")
}

/// An address's failed key checks in the throttle's window.
pub fn failures_key(ip: &str) -> String {
    format!("agw:failed:{ip}")
}

/// Present while an instance is alive (refreshed by its sync task).
pub fn alive_key(instance: &str) -> String {
    format!("agw:alive:{instance}")
}

/// How long an instance's liveness key lasts without a refresh: after a
/// crash, its slots are free again this much later.
pub const ALIVE_MS: u64 = 5_000;

/// Takes a lease of requests from a key's rate window, opening the window
/// if there is none. KEYS: the window. ARGV: the limit, the period (ms),
/// the largest lease. Returns {granted, ms until the window ends}; 0
/// granted means the window is used up.
///
/// The lease is an eighth of what is left (at least 1, at most the
/// largest lease): big while the key is far from its limit, so most
/// requests find a lease at hand, and 1 near it, so little is held unused
/// by an instance when others need it.
pub static LEASE_REQUESTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local most = tonumber(ARGV[3])
local used = tonumber(redis.call('GET', KEYS[1]) or '-1')
local ttl = period
if used < 0 then
  used = 0
else
  ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then
    redis.call('PEXPIRE', KEYS[1], period)
    ttl = period
  end
end
local left = limit - used
if left <= 0 then
  return {0, ttl}
end
local grant = math.max(1, math.min(most, math.floor(left / 8)))
if used == 0 then
  redis.call('SET', KEYS[1], grant, 'PX', ttl)
else
  redis.call('INCRBY', KEYS[1], grant)
end
return {grant, ttl}
",
    )
});

/// Takes concurrency slots of a key, counting only instances that are
/// alive (a crashed instance's slots are dropped). KEYS: the slots hash.
/// ARGV: this instance, the limit, the largest grant, the liveness key
/// prefix. Returns the slots granted (0: all in use).
pub static TAKE_SLOTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local held = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #held, 2 do
  local instance = held[i]
  if instance ~= ARGV[1] and redis.call('EXISTS', ARGV[4] .. instance) == 0 then
    redis.call('HDEL', KEYS[1], instance)
  else
    total = total + tonumber(held[i + 1])
  end
end
local left = tonumber(ARGV[2]) - total
if left <= 0 then
  return 0
end
local grant = math.max(1, math.min(tonumber(ARGV[3]), math.floor(left / 8)))
redis.call('HINCRBY', KEYS[1], ARGV[1], grant)
redis.call('PEXPIRE', KEYS[1], 86400000)
return grant
",
    )
});

/// Adds tokens to a key's window (opening it if there is none) and tells
/// every instance the new total. KEYS: the window. ARGV: the tokens, the
/// period (ms), the key id. Returns {used, ms until the window ends}.
pub static ADD_TOKENS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
redis.call('PUBLISH', 'agw:events', 't ' .. ARGV[3] .. ' ' .. used .. ' ' .. ttl)
return {used, ttl}
",
    )
});

/// Reads a key's token window. KEYS: the window. Returns {used, ms until
/// it ends}, {0, -2} when there is none.
pub static READ_TOKENS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
return {used, redis.call('PTTL', KEYS[1])}
",
    )
});

/// Counts a failed key check from an address; the one that reaches the
/// limit blocks the address on every instance. KEYS: the address's
/// counter. ARGV: the limit, the window (ms), the block (ms), the address.
/// Returns 1 when this failure blocked it.
pub static KEY_FAILED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if n == tonumber(ARGV[1]) then
  redis.call('PUBLISH', 'agw:events', 'b ' .. ARGV[4] .. ' ' .. ARGV[3])
  return 1
end
return 0
",
    )
});

/// Adds key ids to the revoked set and announces each, in one step.
pub fn revocations(ids: &[KeyId]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for id in ids {
        let id = id.to_string();
        pipe.sadd(REVOKED, &id).ignore();
        pipe.publish(EVENTS, format!("r {id}")).ignore();
    }
    pipe
}
