-- Remove sessions and every key they own, checking inside the script that each one may go.
--
-- The check and the delete are one atomic step: a session that heartbeated a moment before
-- this script runs has a fresh index entry and is left alone, however stale it looked when
-- the caller picked it.
--
-- Modes (ARGV[1]):
--   stale:  remove a session only if its heartbeat index entry is <= ARGV[2] (the cutoff).
--           Reason: stuck_starting / stuck_error by its status, else heartbeat_stale.
--   legacy: remove a session only if it is NOT in the index (written by the old system) and
--           its newest of lastActive / createdAt is < ARGV[2]. Reason: legacy_max_age.
--   owned:  remove a session only if ARGV[2] (a worker id) still owns it, or nobody does: its
--           agent exited on that worker. A session another worker has taken over is left alone.
--           Reason: agent_exited.
--
-- KEYS[1]: the heartbeat index; KEYS[2]: session:starting; KEYS[3]: session:ready
-- ARGV[3..]: session ids (validated by the caller)
-- Returns a flat array: id, reason, for each session removed.
local mode, arg = ARGV[1], ARGV[2]
local removed = {}
for i = 3, #ARGV do
    local id = ARGV[i]
    local state = 'session:' .. id
    local reason = nil
    if mode == 'owned' then
        local owner = redis.call('HGET', state, 'workerId')
        if not owner or owner == arg then
            reason = 'agent_exited'
        end
    elseif mode == 'stale' then
        local score = redis.call('ZSCORE', KEYS[1], id)
        if score and tonumber(score) <= tonumber(arg) then
            local status = redis.call('HGET', state, 'status')
            if status == 'starting' then
                reason = 'stuck_starting'
            elseif status == 'error' then
                reason = 'stuck_error'
            else
                reason = 'heartbeat_stale'
            end
        end
    elseif mode == 'legacy' then
        if not redis.call('ZSCORE', KEYS[1], id) and redis.call('TYPE', state).ok == 'hash' then
            local times = redis.call('HMGET', state, 'lastActive', 'createdAt')
            local newest = math.max(tonumber(times[1]) or 0, tonumber(times[2]) or 0)
            if newest > 0 and newest < tonumber(arg) then
                reason = 'legacy_max_age'
            end
        end
    else
        return redis.error_reply('unknown mode ' .. tostring(mode))
    end
    if reason then
        redis.call('DEL', state, state .. ':config', 'agent:' .. id .. ':pid',
            'agent:' .. id .. ':logs', 'agent:' .. id .. ':health')
        redis.call('SREM', KEYS[2], id)
        redis.call('SREM', KEYS[3], id)
        redis.call('ZREM', KEYS[1], id)
        removed[#removed + 1] = id
        removed[#removed + 1] = reason
    end
end
return removed
