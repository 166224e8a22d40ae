-- Refresh the liveness of every agent a worker owns, in one call.
--
-- For each session: if session:<id> is gone, the orchestrator ended the session (it deletes
-- the keys); report it so the worker stops the agent, and do not recreate anything. If another
-- worker has claimed the session (we were cut off from Redis long enough to be presumed dead),
-- report it as lost: that agent must stop, and the session is not ours to refresh. Otherwise
-- write lastActive and agent:<id>:health, extend the TTLs, and move the session's entry in the
-- heartbeat index to now, which is what keeps the sweep away from it.
--
-- KEYS[1]: the heartbeat index (ZSET session id -> unix seconds)
-- ARGV[1]: now (unix seconds)
-- ARGV[2]: TTL of the session keys, in seconds
-- ARGV[3]: max-age cutoff: a createdAt before this is too old
-- ARGV[4]: this worker's id
-- ARGV[5..]: session ids (validated by the caller)
-- Returns {gone ids, too-old ids, lost ids}.
local now, ttl, oldest, me = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local gone, too_old, lost = {}, {}, {}
for i = 5, #ARGV do
    local id = ARGV[i]
    local state = 'session:' .. id
    if redis.call('EXISTS', state) == 0 then
        gone[#gone + 1] = id
        redis.call('ZREM', KEYS[1], id)
    elseif redis.call('HGET', state, 'workerId') ~= me then
        lost[#lost + 1] = id
    else
        local health = 'agent:' .. id .. ':health'
        -- Our agent is running: re-assert `ready` in case recording it failed (a Redis error
        -- right at that moment would otherwise leave the session `starting` for good).
        if redis.call('HGET', state, 'status') ~= 'ready' then
            redis.call('HSET', state, 'status', 'ready')
            redis.call('SREM', 'session:starting', id)
            redis.call('SADD', 'session:ready', id)
        end
        redis.call('HSET', state, 'lastActive', now)
        redis.call('EXPIRE', state, ttl)
        redis.call('HSET', health, 'last_check', now, 'status', 'alive')
        redis.call('EXPIRE', health, ttl)
        redis.call('EXPIRE', 'agent:' .. id .. ':pid', ttl)
        redis.call('ZADD', KEYS[1], now, id)
        local created = tonumber(redis.call('HGET', state, 'createdAt'))
        if created and created < oldest then
            too_old[#too_old + 1] = id
        end
    end
end
return { gone, too_old, lost }
