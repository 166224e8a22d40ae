-- Record a failed start, if this worker still owns the session.
--
-- If another worker took the session over while our attempts were failing, its state stands:
-- writing `error` over it would let a third worker claim the session and start another agent.
--
-- KEYS[1]: session:<id>   KEYS[2]: session:starting   KEYS[3]: session:ready
-- KEYS[4]: the heartbeat index
-- ARGV[1]: this worker's id   ARGV[2]: now   ARGV[3]: TTL   ARGV[4]: session id
-- ARGV[5]: the error message
-- Returns 1 when recorded, 0 when the session is another worker's.
local owner = redis.call('HGET', KEYS[1], 'workerId')
if owner and owner ~= ARGV[1] then
    return 0
end
redis.call('HSET', KEYS[1], 'status', 'error', 'error', ARGV[5], 'lastActive', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SREM', KEYS[2], ARGV[4])
redis.call('SREM', KEYS[3], ARGV[4])
-- Indexed so that the sweep removes a failed session after `stale_after`.
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[4])
return 1
