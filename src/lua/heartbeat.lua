-- Refresh the liveness of every agent a worker owns, in one call.
--
-- For each session:
-- - session:<id> gone (or a hash without `workerId`: every record of ours has one, so ours
--   was deleted and what is there was written after that, e.g. the agent's
--   conversationStartTime racing the orchestrator's cleanup): who deleted it decides.
--   - Its entry in our heartbeat index is still there: the orchestrator ended the session (it
--     deletes the session's keys, and knows nothing of our index). Reported as gone so the
--     worker stops the agent; nothing is recreated, and a leftover hash goes.
--   - The index entry is gone too: the orchestrator did not do this. Redis lost data (a
--     restart without persistence, a failover, eviction) or a sweep took the session while we
--     were cut off from Redis, and the agent is still live. Reported as vanished, touching
--     nothing: the worker writes the record again from what it holds in memory.
-- - another worker owns it (we were cut off from Redis long enough to be presumed dead and it
--   took the session over): reported as lost, that agent must stop; its record is not ours.
-- - a record with `endedAt` is left alone: the agent has exited and its end is recorded.
-- - otherwise `lastActive`, agent:<id>:health, the TTLs and the session's entry in the
--   heartbeat index (what keeps the sweep away) are refreshed. The status is the worker's only
--   while it is `starting` or `ready`: `starting` becomes `ready` (the orchestrator writes
--   `status=starting` right after it enqueues, which can land after our ready record, and a
--   failed ready write must not leave the session starting for good); `terminated` (the
--   orchestrator's, when the user ran out of credit) is reported as a stop request; the
--   agent's `completed`, `error` and values we do not know are left as they are. What the
--   agent's tree uses (memory now and at its peak, CPU time) goes to agent:<id>:health beside
--   `last_check` and `status` when the worker has read it.
--
-- KEYS[1]: the heartbeat index   KEYS[2]: session:starting   KEYS[3]: session:ready
-- KEYS[4..]: per session, three keys: session:<id>, agent:<id>:health, agent:<id>:pid
-- ARGV[1]: now (unix seconds)    ARGV[2]: TTL of the session keys, in seconds
-- ARGV[3]: max-age cutoff: a createdAt before this is too old
-- ARGV[4]: this worker's id
-- ARGV[5..]: per session, in the order of its keys: its id, then memory_bytes,
--   memory_peak_bytes and cpu_seconds ('' when not read yet)
-- Last KEY and ARGV: the event stream and its bound (session_events.lua): `ready` when a
-- session goes from starting to ready here, `terminated` (with the orchestrator's
-- terminationReason) at each heartbeat that finds it while the agent still runs.
-- Returns {gone ids, too-old ids, lost ids, terminated ids, vanished ids}.
local now, ttl, oldest, me = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local gone, too_old, lost, terminated, vanished = {}, {}, {}, {}, {}
for i = 5, OWN_ARGS, 4 do
    local id = ARGV[i]
    local k = 4 + (i - 5) / 4 * 3
    local state, health, pid = KEYS[k], KEYS[k + 1], KEYS[k + 2]
    local current = redis.call('HMGET', state, 'workerId', 'status', 'createdAt', 'endedAt',
        'agentPid', 'terminationReason')
    if not current[1] and not redis.call('ZSCORE', KEYS[1], id) then
        vanished[#vanished + 1] = id
    elseif not current[1] then
        gone[#gone + 1] = id
        redis.call('ZREM', KEYS[1], id)
        -- Written after the orchestrator's cleanup, by nobody who will clean it up (it has no
        -- TTL): it goes now.
        redis.call('DEL', state)
    elseif current[1] ~= me then
        lost[#lost + 1] = id
    elseif current[4] then
        -- Ended a moment ago (the agent exited; its end was recorded after this heartbeat's
        -- list was taken): nothing to refresh, the record keeps its end TTL.
    else
        local status = current[2]
        if status == 'starting' or not status then
            redis.call('HSET', state, 'status', 'ready')
            redis.call('SREM', KEYS[2], id)
            redis.call('SADD', KEYS[3], id)
            session_event(id, 'ready', me)
        elseif status == 'ready' then
            -- A no-op unless the set lost the id (or the whole set) to eviction.
            redis.call('SADD', KEYS[3], id)
        elseif status == 'terminated' then
            terminated[#terminated + 1] = id
            session_event(id, 'terminated', me, current[6])
        end
        redis.call('HSET', state, 'lastActive', now)
        redis.call('EXPIRE', state, ttl)
        redis.call('HSET', health, 'last_check', now, 'status', 'alive')
        if ARGV[i + 1] ~= '' then
            redis.call('HSET', health, 'memory_bytes', ARGV[i + 1], 'memory_peak_bytes',
                ARGV[i + 2], 'cpu_seconds', ARGV[i + 3])
        end
        redis.call('EXPIRE', health, ttl)
        -- Written, not just extended: it comes back if it was evicted.
        if current[5] then
            redis.call('SET', pid, current[5], 'EX', ttl)
        end
        redis.call('ZADD', KEYS[1], now, id)
        local created = tonumber(current[3])
        if created and created < oldest then
            too_old[#too_old + 1] = id
        end
    end
end
return { gone, too_old, lost, terminated, vanished }
