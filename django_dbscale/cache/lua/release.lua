-- Release a lease the caller holds (a fill it decided not to store).
-- KEYS[1] lease key; ARGV[1] the caller's nonce. Returns 1 if released.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
