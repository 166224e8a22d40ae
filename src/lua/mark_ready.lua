-- Record a ready agent, if this worker still owns the session.
--
-- Another worker may have taken the session over while our start was running (we were cut
-- off from Redis long enough to be presumed dead); then its record stands and our agent must
-- go. The ownership check and the writes are one step. (The session hash got its TTL at the
-- claim, moments ago, and heartbeats renew it: no EXPIRE here.)
--
-- KEYS[1]: session:<id>   KEYS[2]: session:starting   KEYS[3]: session:ready
-- KEYS[4]: agent:<id>:pid KEYS[5]: agent:<id>:health  KEYS[6]: the heartbeat index
-- ARGV[1]: this worker's id   ARGV[2]: now   ARGV[3]: TTL   ARGV[4]: session id
-- ARGV[5]: pid   ARGV[6]: pgid   ARGV[7]: start-up time (s)
-- Returns 1 when recorded, 0 when the session is not ours (any more).
if redis.call('HGET', KEYS[1], 'workerId') ~= ARGV[1] then
    return 0
end
redis.call('HSET', KEYS[1], 'status', 'ready', 'agentPid', ARGV[5], 'agentPgid', ARGV[6],
    'startupTime', ARGV[7], 'lastActive', ARGV[2])
redis.call('SREM', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SET', KEYS[4], ARGV[5], 'EX', ARGV[3])
redis.call('HSET', KEYS[5], 'last_check', ARGV[2], 'status', 'ready')
redis.call('EXPIRE', KEYS[5], ARGV[3])
redis.call('ZADD', KEYS[6], ARGV[2], ARGV[4])
return 1
