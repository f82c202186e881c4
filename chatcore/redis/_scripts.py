"""The Lua scripts of the Redis backplane: where a room's order is decided (Rule 1)."""

from __future__ import annotations

from typing import Final

from ..sansio._outbox import dumps

__all__ = [
    "JSON",
    "LEASE_LUA",
    "PUBLISH_LUA",
    "READ_LUA",
    "RECENT_LUA",
    "ROLLBACK_LUA",
    "SCRIPTS",
]


class _WireJSON:
    """Encodes with :func:`chatcore.sansio._outbox.dumps` (``JSON.encode(value)``)."""

    encode = staticmethod(dumps)


# One JSON encoder with exactly the options of chatcore.sansio.encode, so every
# fragment the script concatenates is byte-identical to encode_message's.
JSON: Final = _WireJSON()

#: Sequence, store and publish one room message (Rule 1).
#: KEYS: meta, log. ARGV: fresh epoch, room JSON, sender JSON, data JSON,
#: nonce field (the nonce, and a sampled message's publish time after a tab:
#: see ``_records.nonce_field``; only on the channel, never in the stream),
#: max messages, channel, log TTL ms (0: none), meta TTL ms (0: none),
#: max bytes (0 or absent: none).
#: The stream is trimmed from its old end by count (up to 64 more may
#: be kept, as ``MAXLEN ~`` would) and by the bytes of its texts, counted in
#: the meta hash's ``b`` (reset whenever the stream starts anew).
PUBLISH_LUA: Final = r"""
local meta, log = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', log)
  redis.call('HSET', meta, 'e', epoch)
end
local offset = redis.call('HINCRBY', meta, 'o', 1)
local o = string.format('%d', offset)
local text = '{"type":"message","room":' .. ARGV[2] .. ',"offset":' .. o ..
  ',"epoch":"' .. epoch .. '","from":' .. ARGV[3] .. ',"data":' .. ARGV[4] .. '}'
local now = redis.call('TIME')
local ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
if redis.call('EXISTS', log) == 0 then redis.call('HSET', meta, 'b', 0) end
redis.call('XADD', log, o .. '-0', 't', ms, 'm', text)
local held = redis.call('HINCRBY', meta, 'b', #text)
local max_n, max_b = tonumber(ARGV[6]), tonumber(ARGV[10] or '0')
local excess = redis.call('XLEN', log) - max_n
if excess > 64 or (max_b > 0 and held > max_b) then
  local keep, start = nil, '-'
  while not keep do
    local batch = redis.call('XRANGE', log, start, '+', 'COUNT', 64)
    if #batch == 0 then break end
    for _, entry in ipairs(batch) do
      if excess <= 0 and (max_b == 0 or held <= max_b) then keep = entry[1]; break end
      held = held - #entry[2][4]
      excess = excess - 1
      start = '(' .. entry[1]
    end
  end
  if keep then
    redis.call('XTRIM', log, 'MINID', keep)
  else
    redis.call('XTRIM', log, 'MAXLEN', 0)
  end
  redis.call('HSET', meta, 'b', held)
end
if ARGV[8] ~= '0' then redis.call('PEXPIRE', log, ARGV[8]) end
if ARGV[9] ~= '0' then redis.call('PEXPIRE', meta, ARGV[9]) end
redis.call('PUBLISH', ARGV[7], o .. '\n' .. epoch .. '\n' .. ARGV[5] .. '\n' .. text)
return {epoch, offset}
"""

#: A room's position and, optionally, stored messages after an offset.
#: KEYS: meta, log. ARGV: fresh epoch ('' : do not create one, nor refresh the
#: TTL), expected epoch ('' : any), after, upto ('+' : the end), count (0: no
#: messages), meta TTL ms (0: none).
#: Returns {epoch or false, last offset, now ms, entries}; entries only when
#: the epoch is the expected one.
READ_LUA: Final = r"""
local meta, log = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if ARGV[1] ~= '' then
  if not epoch then
    epoch = ARGV[1]
    redis.call('DEL', log)
    redis.call('HSET', meta, 'e', epoch, 'o', 0)
  end
  if ARGV[6] ~= '0' then redis.call('PEXPIRE', meta, ARGV[6]) end
end
local now = redis.call('TIME')
local ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
if not epoch then return {false, 0, ms, {}} end
local offset = tonumber(redis.call('HGET', meta, 'o') or '0')
local entries = {}
local count = tonumber(ARGV[5])
if count > 0 and (ARGV[2] == '' or ARGV[2] == epoch) then
  local upto = ARGV[4]
  if upto ~= '+' then upto = upto .. '-0' end
  entries = redis.call('XRANGE', log, (tonumber(ARGV[3]) + 1) .. '-0', upto, 'COUNT', count)
end
return {epoch, offset, ms, entries}
"""

#: A room's newest stored messages.
#: KEYS: meta, log. ARGV: count. Returns {epoch or false, now ms, entries newest first}.
RECENT_LUA: Final = r"""
local epoch = redis.call('HGET', KEYS[1], 'e')
local now = redis.call('TIME')
local ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
if not epoch then return {false, ms, {}} end
return {epoch, ms, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[1])}
"""

#: Refresh this node's lease and reap expired ones.
#: KEYS: nodes. ARGV: node id, ttl ms. Returns {now ms, {node, expiry, ...}}.
LEASE_LUA: Final = r"""
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
return {string.format('%d', ms), redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
"""

#: End a room's epoch that went back (its offset is below one already handed out).
#: KEYS: meta, log. ARGV: the epoch seen, the offset handed out, a fresh epoch.
#: Returns the room's epoch afterwards (unchanged if another node replaced it first).
ROLLBACK_LUA: Final = r"""
local epoch = redis.call('HGET', KEYS[1], 'e')
local offset = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
if not epoch or (epoch == ARGV[1] and offset < tonumber(ARGV[2])) then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', ARGV[3], 'o', 0)
  return ARGV[3]
end
return epoch
"""

SCRIPTS: Final = {
    "publish": PUBLISH_LUA,
    "read": READ_LUA,
    "recent": RECENT_LUA,
    "lease": LEASE_LUA,
    "rollback": ROLLBACK_LUA,
}
