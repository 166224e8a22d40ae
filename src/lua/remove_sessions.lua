-- Remove sessions and every key they own, checking inside the script that each one may go.
--
-- The check and the delete are one atomic step: a session that heartbeated a moment before
-- this script runs has a fresh index entry and is left alone, however stale it looked when
-- the caller picked it.
--
-- Modes (ARGV[1]):
--   stale:  a session whose heartbeat index entry is <= ARGV[2] (the stale cutoff).
--           Live (starting or ready): its worker stopped heartbeating, so its agent is gone:
--           removed, reason stuck_starting or heartbeat_stale. Record gone: only our
--           leftovers go (reason gone). Ended (any other status: completed, terminated,
--           error; its end was not recorded, e.g. its worker died right then): the record
--           is the orchestrator's to clean up, so it stays until ARGV[3] (endedAt, else
--           lastActive, at or before it: removed, reason ended_expired); until then it only
--           leaves the index and the state sets, its keys capped at the time it has left.
--           A live session removed here may still have its job coming back (its worker died
--           during the start; the job is re-delivered): the job's record of having claimed
--           the session is cleared (ARGV[5]: the meta key prefix of the jobs' queue, '' for
--           none), so that delivery starts the session again instead of taking the missing
--           record for one the orchestrator ended (see claim_session.lua).
--   legacy: a session NOT in the index (written by the old system) whose newest of
--           lastActive / createdAt is < ARGV[2]. Reason: legacy_max_age.
--
-- A dry run (ARGV[4] = 1) decides exactly the same and writes nothing.
--
-- KEYS[1]: the heartbeat index; KEYS[2]: session:starting; KEYS[3]: session:ready
-- KEYS[4..]: per session, six keys: session:<id>, its config, pid, logs, health and logfile
-- ARGV[2]: the cutoff   ARGV[3]: the ended cutoff (stale mode)   ARGV[4]: 1 for a dry run
-- ARGV[5]: the jobs' meta key prefix (<queue>:meta) or ''
-- ARGV[6..]: the session ids, in the order of their keys (validated by the caller)
-- Last KEY and ARGV: the event stream and its bound (session_events.lua): `swept`, with the
-- reason and the removed record's owner, for each session removed (not in a dry run).
-- Returns a flat array: id, reason, for each session removed (or that would be).
local mode, cutoff, dry = ARGV[1], tonumber(ARGV[2]), ARGV[4] == '1'
local removed = {}
local meta_prefix = ARGV[5]
for i = 6, OWN_ARGS do
    local id = ARGV[i]
    local k = 4 + (i - 6) * 6
    local state = KEYS[k]
    local reason = nil
    local release = nil
    local owner = nil
    if mode == 'stale' then
        local score = redis.call('ZSCORE', KEYS[1], id)
        if score and tonumber(score) <= cutoff then
            local current = redis.call('HMGET', state, 'status', 'endedAt', 'lastActive',
                'workerId')
            local status = current[1]
            owner = current[4]
            if redis.call('EXISTS', state) == 0 then
                reason = 'gone'
            elseif status == 'starting' or status == 'ready' or not status then
                if status == 'starting' then
                    reason = 'stuck_starting'
                else
                    reason = 'heartbeat_stale'
                end
                local task = redis.call('HGET', state, 'taskId')
                if task and meta_prefix ~= '' and not dry then
                    redis.call('HDEL', meta_prefix .. ':' .. task, 'sessionClaimedAt')
                end
            else
                local ended = tonumber(current[2]) or tonumber(current[3]) or 0
                local left = ended - tonumber(ARGV[3])
                if left <= 0 then
                    reason = 'ended_expired'
                else
                    release = left
                end
            end
        end
    elseif mode == 'legacy' then
        if not redis.call('ZSCORE', KEYS[1], id) and redis.call('TYPE', state).ok == 'hash' then
            local times = redis.call('HMGET', state, 'lastActive', 'createdAt', 'workerId')
            owner = times[3]
            local newest = math.max(tonumber(times[1]) or 0, tonumber(times[2]) or 0)
            if newest > 0 and newest < cutoff then
                reason = 'legacy_max_age'
            end
        end
    else
        return redis.error_reply('unknown mode ' .. tostring(mode))
    end
    if reason then
        removed[#removed + 1] = id
        removed[#removed + 1] = reason
    end
    if dry then
        reason, release = nil, nil
    end
    if reason or release then
        redis.call('SREM', KEYS[2], id)
        redis.call('SREM', KEYS[3], id)
        redis.call('ZREM', KEYS[1], id)
    end
    if reason then
        redis.call('DEL', KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5])
        session_event(id, 'swept', owner, reason)
    elseif release then
        for j = k, k + 5 do
            local ttl = redis.call('TTL', KEYS[j])
            if ttl == -1 or ttl > release then
                redis.call('EXPIRE', KEYS[j], release)
            end
        end
    end
end
return removed
