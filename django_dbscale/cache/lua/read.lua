-- Serve a cached entry if it was stored under the current versions, else hand out a lease.
--
-- KEYS[1]  entry payload key   KEYS[2]  entry header key   KEYS[3]  lease key
-- KEYS[4..n]  version keys
-- ARGV[1]  the caller's nonce: lease owner, and prefix of tokens for recreated versions
-- ARGV[2]  lease time-to-live in milliseconds
-- ARGV[3]  time-to-live in seconds of a recreated version key (fills extend it)
-- ARGV[4]  '1' to ignore the stored entry (it failed to unpickle), else ''
--
-- A version value is "<token>:<lsn>"; <lsn> is 16 hex digits, or 'P' when the key had to be
-- recreated and the last invalidation's WAL position is unknown (fill from the primary).
-- An entry is two keys written together by fill.lua: the pickled payload, and its header,
-- the version values it was filled under joined with '|'. One MGET reads payload, header
-- and versions, so a hit costs the server about what a plain GET does.
--
-- A missing version key (evicted, expired, flushed) is recreated with a token never used
-- before (nonce, server time in microseconds, key index), so an entry filled before the
-- loss can never match again. A lost generation key (see continuity.py) is recreated with
-- position zero: the table versions next to it still carry their own positions.
--
-- Returns {1, payload} on a hit, {0, header, lease_granted} on a miss.
local values = redis.call('MGET', KEYS[1], KEYS[2], unpack(KEYS, 4, #KEYS))
local nversions = #KEYS - 3
local now = nil
local zero = string.rep('0', 16)
for i = 1, nversions do
  if not values[i + 2] then
    if not now then
      now = redis.call('TIME')
    end
    local lsn = 'P'
    if string.sub(KEYS[i + 3], -11) == '~generation' then
      lsn = zero
    end
    values[i + 2] = ARGV[1] .. now[1] .. now[2] .. '.' .. i .. ':' .. lsn
    redis.call('SET', KEYS[i + 3], values[i + 2], 'EX', ARGV[3])
  end
end
local header = table.concat(values, '|', 3, nversions + 2)
if ARGV[4] ~= '1' and values[1] and values[2] == header then
  return {1, values[1]}
end
local lease = 0
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) or redis.call('GET', KEYS[3]) == ARGV[1] then
  lease = 1  -- granted, or already ours (our own fill, sent without waiting, is still queued)
end
return {0, header, lease}
