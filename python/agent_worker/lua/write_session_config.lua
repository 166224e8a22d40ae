-- Replace a session's config hash exactly as the orchestrator writes it.
--
-- Delete first, so fields of an older config (an openingLine that is no longer set) do not
-- survive; write and set the TTL in the same atomic step, so a reader never sees a config
-- without its expiry.
--
-- KEYS[1]: session:<id>:config
-- ARGV[1]: TTL in seconds (> 0)
-- ARGV[2..]: field, value pairs
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
