-- Record the end of a session on this worker: its agent exited, or its start failed for good.
--
-- The record outlives the agent (contract §5): the orchestrator's end-of-session handler runs
-- after the agent has gone, reads session:<id> (billing from the agent's own
-- conversationDurationMinutes) and deletes the keys itself. So nothing is deleted here but
-- the pid; the session leaves the state sets and our heartbeat index (it is no longer live,
-- and the sweep must never judge it by a heartbeat), gets `endedAt` and the exit, and every
-- key of it keeps a TTL of at most `session.ended_ttl` (never lengthened: a shorter TTL the
-- orchestrator set stands).
--
-- `status` is written only over the worker's own values (starting, ready): `completed` for a
-- clean exit, `error` (with `error`) otherwise. The agent's `completed` and the
-- orchestrator's `terminated` stay. When the record is already gone (the orchestrator ended
-- the session first) nothing is recreated, and a hash without `workerId` counts as gone:
-- every record of ours has one, so what is there was written after the orchestrator's
-- cleanup (the agent's conversationStartTime or billing fields, racing it) and goes with our
-- leftovers. When another worker owns the session (it took it over while we were cut off)
-- nothing of its record is touched.
--
-- KEYS[1..6]: session:<id>, session:<id>:config, agent:<id>:pid, agent:<id>:logs,
--             agent:<id>:health, agent:<id>:logfile
-- KEYS[7]: session:starting   KEYS[8]: session:ready   KEYS[9]: the heartbeat index
-- KEYS[10]: the legacy start-up timeout counter
-- ARGV[1]: this worker's id   ARGV[2]: now   ARGV[3]: session.ended_ttl (s)   ARGV[4]: id
-- ARGV[5]: 'exitCode', 'exitSignal', or '' (a start that failed: no exit to record)
-- ARGV[6]: the exit code or signal number
-- ARGV[7]: the error ('' for a clean exit)
-- ARGV[8]: why the worker stopped the agent ('' when it ended on its own)
-- ARGV[9]: 1 to count a start-up timeout (legacy metrics)
-- Last KEY and ARGV: the event stream and its bound (session_events.lua). One event per end
-- recorded here (none when another worker owns the session): `stopped` with the stop reason
-- when the worker stopped the agent; otherwise the status the record was left with (`completed`,
-- `error` with the error, or the agent's or orchestrator's own), and for a record already gone
-- `completed` or `error` from the exit.
-- Returns the status the record was left with, '' when the record was gone, or false when
-- another worker owns it.
local state, id = KEYS[1], ARGV[4]

local function end_event(status)
    if ARGV[8] ~= '' then
        session_event(id, 'stopped', ARGV[1], ARGV[8])
    else
        session_event(id, status, ARGV[1], ARGV[7])
    end
end
if ARGV[9] == '1' then
    redis.call('INCR', KEYS[10])
end
local current = redis.call('HMGET', state, 'workerId', 'status')
local owner, status = current[1], current[2]
if not owner then
    -- Ended by the orchestrator: our leftovers go, and whatever was written after its cleanup.
    redis.call('SREM', KEYS[7], id)
    redis.call('SREM', KEYS[8], id)
    redis.call('ZREM', KEYS[9], id)
    redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
    end_event(ARGV[7] == '' and 'completed' or 'error')
    return ''
end
if owner ~= ARGV[1] then
    return false
end
local now = ARGV[2]
local fields = { 'endedAt', now, 'lastActive', now }
if ARGV[5] ~= '' then
    fields[#fields + 1] = ARGV[5]
    fields[#fields + 1] = ARGV[6]
end
if ARGV[8] ~= '' then
    fields[#fields + 1] = 'stopReason'
    fields[#fields + 1] = ARGV[8]
end
if not status or status == 'starting' or status == 'ready' then
    if ARGV[7] == '' then
        status = 'completed'
    else
        status = 'error'
        fields[#fields + 1] = 'error'
        fields[#fields + 1] = ARGV[7]
    end
    fields[#fields + 1] = 'status'
    fields[#fields + 1] = status
elseif ARGV[7] ~= '' then
    fields[#fields + 1] = 'lastError'
    fields[#fields + 1] = ARGV[7]
end
redis.call('HSET', state, unpack(fields))
if redis.call('EXISTS', KEYS[5]) == 1 then
    redis.call('HSET', KEYS[5], 'last_check', now, 'status', 'exited')
end
redis.call('SREM', KEYS[7], id)
redis.call('SREM', KEYS[8], id)
redis.call('ZREM', KEYS[9], id)
redis.call('DEL', KEYS[3])
local ttl = tonumber(ARGV[3])
for _, key in ipairs({ KEYS[1], KEYS[2], KEYS[4], KEYS[5], KEYS[6] }) do
    local left = redis.call('TTL', key)
    if left == -1 or left > ttl then
        redis.call('EXPIRE', key, ttl)
    end
end
end_event(status)
return status
