-- Record a ready agent, if this worker still owns the session and it has not ended.
--
-- Another worker may have taken the session over while our start was running (we were cut
-- off from Redis long enough to be presumed dead): then its record stands and our agent must
-- go. The orchestrator may have ended the session meanwhile (deleted its keys, or written
-- `terminated`): then nothing is recreated or overwritten and our agent must go too. The
-- orchestrator's own `status=starting`, written right after it enqueued, is ours to replace.
-- The checks and the writes are one step. (The session hash got its TTL at the claim,
-- moments ago, and heartbeats renew it: no EXPIRE of it here.)
--
-- With the legacy metrics on, the original worker's start-up histogram is updated here too:
-- every cumulative bucket the start-up time fits in, `le_inf`, the sum and the count.
--
-- KEYS[1]: session:<id>   KEYS[2]: session:starting   KEYS[3]: session:ready
-- KEYS[4]: agent:<id>:pid KEYS[5]: agent:<id>:health  KEYS[6]: the heartbeat index
-- KEYS[7]: legacy histogram HASH   KEYS[8]: legacy duration HASH (sum, count)
-- ARGV[1]: this worker's id   ARGV[2]: now   ARGV[3]: TTL   ARGV[4]: session id
-- ARGV[5]: pid   ARGV[6]: pgid   ARGV[7]: start-up time (s)   ARGV[8]: 1 when a warm process
-- took the session, else 0   ARGV[9]: 1 for legacy metrics
-- ARGV[10..]: the legacy histogram's finite bucket bounds (s), ascending
-- Last KEY and ARGV: the event stream and its bound (session_events.lua): `ready` is appended.
-- Returns 1 when recorded, 0 when another worker owns the session, -1 when its record is
-- gone, or the status of a session that ended meanwhile.
local current = redis.call('HMGET', KEYS[1], 'workerId', 'status')
-- Every record of ours has a workerId: without one, ours was deleted (what is there, if
-- anything, was written after the orchestrator's cleanup).
if not current[1] then
    return -1
end
if current[1] ~= ARGV[1] then
    return 0
end
local status = current[2]
if status and status ~= 'starting' and status ~= 'ready' then
    return status
end
redis.call('HSET', KEYS[1], 'status', 'ready', 'agentPid', ARGV[5], 'agentPgid', ARGV[6],
    'startupTime', ARGV[7], 'lastActive', ARGV[2], 'warm', ARGV[8])
redis.call('SREM', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SET', KEYS[4], ARGV[5], 'EX', ARGV[3])
redis.call('HSET', KEYS[5], 'last_check', ARGV[2], 'status', 'ready')
redis.call('EXPIRE', KEYS[5], ARGV[3])
redis.call('ZADD', KEYS[6], ARGV[2], ARGV[4])
if ARGV[9] == '1' then
    local seconds = tonumber(ARGV[7])
    for i = 10, OWN_ARGS do
        if seconds <= tonumber(ARGV[i]) then
            redis.call('HINCRBY', KEYS[7], 'le_' .. ARGV[i], 1)
        end
    end
    redis.call('HINCRBY', KEYS[7], 'le_inf', 1)
    redis.call('HINCRBYFLOAT', KEYS[8], 'sum', ARGV[7])
    redis.call('HINCRBY', KEYS[8], 'count', 1)
end
if status ~= 'ready' then
    session_event(ARGV[4], 'ready', ARGV[1])
end
return 1
