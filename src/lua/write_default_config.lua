-- Write a session's default config only if the orchestrator has not written one meanwhile.
--
-- HSETNX works per field; this makes the whole hash conditional, so a config that arrives
-- between our HGETALL and this write is never overwritten or mixed with defaults.
--
-- KEYS[1]: session:<id>:config
-- ARGV[1]: TTL in seconds
-- ARGV[2..]: field, value pairs
-- Returns 1 when written, 0 when the key already existed.
if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
