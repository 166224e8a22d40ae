-- Claim a session for this worker and mark it `starting`, unless another live worker owns it.
--
-- One live agent per session across replicas: a duplicate delivery (a re-run after a crash,
-- a double enqueue past the idempotency window, two replicas) must not start a second agent.
-- The owner is `workerId` in session:<id>. Its claim stands while the session is starting or
-- ready and the owner process is alive (its presence heartbeat in the workers ZSET is newer
-- than the orphan timeout). A dead owner's agents died with it (death signal), so its claim
-- can be taken over.
--
-- KEYS[1]: session:<id>
-- KEYS[2]: session:starting
-- KEYS[3]: session:ready
-- KEYS[4]: the heartbeat index
-- KEYS[5]: agent-worker:workers (worker id -> last presence heartbeat)
-- ARGV[1]: this worker's id
-- ARGV[2]: now (unix seconds)
-- ARGV[3]: presence older than this means the owner is dead
-- ARGV[4]: TTL of the session hash
-- ARGV[5]: session id
-- ARGV[6..]: field, value pairs to write (status, voiceId, taskId, ...)
-- Returns {1, previous owner or '', ''} when claimed, {0, owner, status} when another live worker
-- holds it (status `starting` or `ready`).
local me, now = ARGV[1], ARGV[2]
local owner = redis.call('HGET', KEYS[1], 'workerId')
local status = redis.call('HGET', KEYS[1], 'status')
if owner and owner ~= me and (status == 'starting' or status == 'ready') then
    local seen = redis.call('ZSCORE', KEYS[5], owner)
    if seen and tonumber(seen) > tonumber(ARGV[3]) then
        return { 0, owner, status }
    end
end
redis.call('HSET', KEYS[1], 'workerId', me, 'lastActive', now, unpack(ARGV, 6))
redis.call('HSETNX', KEYS[1], 'createdAt', now)
redis.call('HDEL', KEYS[1], 'error')
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('SREM', KEYS[3], ARGV[5])
redis.call('SADD', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[4], now, ARGV[5])
return { 1, owner or '', '' }
