-- Invalidate: give every version key a fresh token, keeping the highest WAL position.
--
-- KEYS     version keys to bump
-- ARGV[1]  token prefix (unique per call; the key's index is appended)
-- ARGV[2]  the primary's WAL position after the write committed, 16 hex digits
-- ARGV[3]  version key time-to-live in seconds
--
-- Positions are compared as fixed-width hex strings (Lua numbers are doubles and would
-- lose the low bits of a 64-bit LSN). A key recreated after a loss ('P') takes the new
-- position: nothing is known about what it held, and a fill that needs it reads the
-- primary until this bump.
for i, key in ipairs(KEYS) do
  local lsn = ARGV[2]
  local old = redis.call('GET', key)
  if old then
    local old_lsn = string.match(old, ':(%x+)$')
    if old_lsn and #old_lsn == #lsn and old_lsn > lsn then
      lsn = old_lsn
    end
  end
  redis.call('SET', key, ARGV[1] .. i .. ':' .. lsn, 'EX', ARGV[3])
end
return #KEYS
