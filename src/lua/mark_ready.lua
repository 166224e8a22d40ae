-- Record a ready agent, if this worker still owns the session and it has not ended.
--
-- Another worker may have taken the session over while our start was running (we were cut
-- off from Redis long enough to be presumed dead): then its record stands and our agent must
-- go. The orchestrator may have ended the session meanwhile (deleted its keys, or written
-- `terminated`): then nothing is recreated or overwritten and our agent must go too. The
-- orchestrator's own `status=starting`, written right after it enqueued, is ours to replace.
-- The checks and the writes are one step. (The session hash got its TTL at the claim,
-- moments ago, and heartbeats renew it: no EXPIRE of it here, but of a record written again.)
--
-- With the legacy metrics on, the original worker's start-up histogram is updated here too:
-- every cumulative bucket the start-up time fits in, `le_inf`, the sum and the count.
--
-- Redis may also have lost the record during the start (a restart without persistence, a
-- failover, a FLUSHALL): that is not an end. Who deleted it tells them apart, as in
-- heartbeat.lua: the orchestrator deletes the session's keys and knows nothing of our
-- heartbeat index, whose entry the claim wrote. Record gone, index entry still there: the
-- orchestrator ended the session. Both gone: the dataset was lost, and the record is written
-- again from what the worker holds (the claim's fields), with `ready`, instead of the agent
-- being stopped; fields others wrote since stay, and a status not ours means it ended.
--
-- KEYS[1]: session:<id>   KEYS[2]: session:starting   KEYS[3]: session:ready
-- KEYS[4]: agent:<id>:pid KEYS[5]: agent:<id>:health  KEYS[6]: the heartbeat index
-- KEYS[7]: legacy histogram HASH   KEYS[8]: legacy duration HASH (sum, count)
-- ARGV[1]: this worker's id   ARGV[2]: now   ARGV[3]: TTL   ARGV[4]: session id
-- ARGV[5]: pid   ARGV[6]: pgid   ARGV[7]: start-up time (s)   ARGV[8]: how the agent
-- started (0 cold, 1 a warm process took the session, 2 the zygote forked it)
-- ARGV[9]: 1 for legacy metrics
-- ARGV[10]: n, then ARGV[11..10+2n]: the record's field/value pairs (without status and
-- workerId), written when the record was lost
-- ARGV[11+2n]: the start's timeline as JSON, written as `startTimeline` ('' for none)
-- ARGV[12+2n]: m, then ARGV[13+2n..12+2n+2m]: the `ready` event's extra field/value pairs
-- (how the agent started and the phase times)
-- ARGV[13+2n+2m..]: the legacy histogram's finite bucket bounds (s), ascending
-- Last KEY and ARGV: the event stream and its bound (session_events.lua): `ready` is appended.
-- Returns 1 when recorded, 2 when recorded after Redis lost the record, 0 when another worker
-- owns the session, -1 when its record is gone, or the status of a session that ended
-- meanwhile.
local pairs_n = tonumber(ARGV[10])
local timeline = ARGV[11 + 2 * pairs_n]
local extra_n = tonumber(ARGV[12 + 2 * pairs_n])
local extra = {}
for i = 13 + 2 * pairs_n, 12 + 2 * pairs_n + 2 * extra_n do
    extra[#extra + 1] = ARGV[i]
end
local buckets = 13 + 2 * pairs_n + 2 * extra_n
local current = redis.call('HMGET', KEYS[1], 'workerId', 'status')
local status = current[2]
local restored = false
-- Every record of ours has a workerId: without one, ours was deleted (what is there, if
-- anything, was written after that).
if not current[1] then
    if redis.call('ZSCORE', KEYS[6], ARGV[4]) then
        return -1
    end
    if status and status ~= 'starting' and status ~= 'ready' then
        return status
    end
    local fields = { 'workerId', ARGV[1] }
    for i = 11, 10 + 2 * pairs_n do
        fields[#fields + 1] = ARGV[i]
    end
    redis.call('HSET', KEYS[1], unpack(fields))
    redis.call('EXPIRE', KEYS[1], ARGV[3])
    restored = true
elseif current[1] ~= ARGV[1] then
    return 0
elseif status and status ~= 'starting' and status ~= 'ready' then
    return status
end
redis.call('HSET', KEYS[1], 'status', 'ready', 'agentPid', ARGV[5], 'agentPgid', ARGV[6],
    'startupTime', ARGV[7], 'lastActive', ARGV[2], 'warm', ARGV[8])
if timeline ~= '' then
    redis.call('HSET', KEYS[1], 'startTimeline', timeline)
end
redis.call('SREM', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SET', KEYS[4], ARGV[5], 'EX', ARGV[3])
redis.call('HSET', KEYS[5], 'last_check', ARGV[2], 'status', 'ready')
redis.call('EXPIRE', KEYS[5], ARGV[3])
redis.call('ZADD', KEYS[6], ARGV[2], ARGV[4])
if ARGV[9] == '1' then
    local seconds = tonumber(ARGV[7])
    for i = buckets, OWN_ARGS do
        if seconds <= tonumber(ARGV[i]) then
            redis.call('HINCRBY', KEYS[7], 'le_' .. ARGV[i], 1)
        end
    end
    redis.call('HINCRBY', KEYS[7], 'le_inf', 1)
    redis.call('HINCRBYFLOAT', KEYS[8], 'sum', ARGV[7])
    redis.call('HINCRBY', KEYS[8], 'count', 1)
end
if status ~= 'ready' then
    session_event(ARGV[4], 'ready', ARGV[1], nil, extra)
end
if restored then
    return 2
end
return 1
