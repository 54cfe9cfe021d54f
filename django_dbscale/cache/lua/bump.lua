-- Invalidate: give every version key a fresh token, keeping the highest WAL position.
--
-- KEYS     version keys to bump
-- ARGV[1]  token prefix (unique per call; the key's index is appended)
-- ARGV[2]  the primary's WAL position after the write committed, 16 hex digits
-- ARGV[3]  version key time-to-live cap in seconds (VERSION_TIMEOUT)
-- ARGV[4]  version key minimum time-to-live in seconds (TIMEOUT plus a margin)
--
-- Positions are compared as fixed-width hex strings (Lua numbers are doubles and would
-- lose the low bits of a 64-bit LSN). A key recreated after a loss ('P') takes the new
-- position: nothing is known about what it held, and a fill that needs it reads the
-- primary until this bump. So does a key holding the unknown position (all 'f': the
-- writer could not read it), so that it does not force primary reads forever.
--
-- A key keeps its remaining time-to-live if longer than the minimum (fills extend it to
-- their entry's time-to-live), so the keys of rarely read dimension values die early.
local unknown = string.rep('f', 16)
local cap = tonumber(ARGV[3])
local floor = math.min(tonumber(ARGV[4] or ARGV[3]), cap)
for i, key in ipairs(KEYS) do
  local lsn = ARGV[2]
  local old = redis.call('GET', key)
  local ttl = floor
  if old then
    local old_lsn = string.match(old, ':(%x+)$')
    if old_lsn and #old_lsn == #lsn and old_lsn > lsn and old_lsn ~= unknown then
      lsn = old_lsn
    end
    local left = redis.call('TTL', key)
    if left > ttl then
      ttl = math.min(left, cap)
    end
  end
  redis.call('SET', key, ARGV[1] .. i .. ':' .. lsn, 'EX', ttl)
end
return #KEYS
