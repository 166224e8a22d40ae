-- Refresh the liveness of every agent a worker owns, in one call.
--
-- For each session:
-- - session:<id> gone: the orchestrator ended the session (it deletes the keys). Reported so
--   the worker stops the agent; nothing is recreated. A hash without `workerId` counts as
--   gone too: every record of ours has one, so ours was deleted and what is there now was
--   written after that (the agent's conversationStartTime, racing the orchestrator's cleanup).
-- - another worker owns it (we were cut off from Redis long enough to be presumed dead and it
--   took the session over): reported as lost, that agent must stop; its record is not ours.
-- - otherwise `lastActive`, agent:<id>:health, the TTLs and the session's entry in the
--   heartbeat index (what keeps the sweep away) are refreshed. The status is the worker's only
--   while it is `starting` or `ready`: `starting` becomes `ready` (the orchestrator writes
--   `status=starting` right after it enqueues, which can land after our ready record, and a
--   failed ready write must not leave the session starting for good); `terminated` (the
--   orchestrator's, when the user ran out of credit) is reported as a stop request; the
--   agent's `completed`, `error` and values we do not know are left as they are.
--
-- KEYS[1]: the heartbeat index   KEYS[2]: session:starting   KEYS[3]: session:ready
-- KEYS[4..]: per session, three keys: session:<id>, agent:<id>:health, agent:<id>:pid
-- ARGV[1]: now (unix seconds)    ARGV[2]: TTL of the session keys, in seconds
-- ARGV[3]: max-age cutoff: a createdAt before this is too old
-- ARGV[4]: this worker's id
-- ARGV[5..]: the session ids, in the order of their keys
-- Returns {gone ids, too-old ids, lost ids, terminated ids}.
local now, ttl, oldest, me = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local gone, too_old, lost, terminated = {}, {}, {}, {}
for i = 5, #ARGV do
    local id = ARGV[i]
    local k = 4 + (i - 5) * 3
    local state, health, pid = KEYS[k], KEYS[k + 1], KEYS[k + 2]
    local current = redis.call('HMGET', state, 'workerId', 'status', 'createdAt')
    if not current[1] then
        gone[#gone + 1] = id
        redis.call('ZREM', KEYS[1], id)
    elseif current[1] ~= me then
        lost[#lost + 1] = id
    else
        local status = current[2]
        if status == 'starting' or not status then
            redis.call('HSET', state, 'status', 'ready')
            redis.call('SREM', KEYS[2], id)
            redis.call('SADD', KEYS[3], id)
        elseif status == 'terminated' then
            terminated[#terminated + 1] = id
        end
        redis.call('HSET', state, 'lastActive', now)
        redis.call('EXPIRE', state, ttl)
        redis.call('HSET', health, 'last_check', now, 'status', 'alive')
        redis.call('EXPIRE', health, ttl)
        redis.call('EXPIRE', pid, ttl)
        redis.call('ZADD', KEYS[1], now, id)
        local created = tonumber(current[3])
        if created and created < oldest then
            too_old[#too_old + 1] = id
        end
    end
end
return { gone, too_old, lost, terminated }
