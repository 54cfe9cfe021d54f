-- Store a fill only if no version it was read under changed since (check-and-set).
--
-- KEYS[1]  entry payload key   KEYS[2]  entry header key   KEYS[3]  lease key
-- KEYS[4..n]  version keys
-- ARGV[1]  header: the version values the reader saw before it queried the database
-- ARGV[2]  payload            ARGV[3]  entry time-to-live in seconds
-- ARGV[4]  lease nonce ('' if the filler held no lease)
-- ARGV[5]  version key time-to-live cap in seconds (VERSION_TIMEOUT)
--
-- The lease is released whether or not the fill is stored. Version keys the entry depends
-- on get their time-to-live extended to the entry's plus a minute (at most the cap), so
-- versions in use outlive the entries built on them and unused ones expire early.
-- Returns 1 if stored, 0 if a version changed (or vanished) meanwhile.
local values = {}
if #KEYS > 3 then
  values = redis.call('MGET', unpack(KEYS, 4, #KEYS))
end
local stored = 0
local complete = true
for i = 1, #KEYS - 3 do
  if not values[i] then complete = false end
end
if complete and table.concat(values, '|') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
  local want = math.min(tonumber(ARGV[3]) + 60, tonumber(ARGV[5]))
  for i = 4, #KEYS do
    if redis.call('TTL', KEYS[i]) < want then
      redis.call('EXPIRE', KEYS[i], want)
    end
  end
  stored = 1
end
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) == ARGV[4] then
  redis.call('DEL', KEYS[3])
end
return stored
