-- Write again the records of live agents whose records Redis lost (see heartbeat.lua: a
-- session is "vanished" when both its record and its heartbeat index entry are gone, which the
-- orchestrator never does). The worker holds what it wrote; it writes it back, so the
-- orchestrator, the sweep and other replicas see a live session again instead of a live call
-- with no record.
--
-- Fields the worker owns are written; fields others wrote since (into the emptied dataset) stay,
-- and `status` only replaces a status of ours (or none). A session someone else owns by now is
-- skipped.
--
-- KEYS[1]: the heartbeat index   KEYS[2]: session:starting   KEYS[3]: session:ready
-- KEYS[4..]: per session, three keys: session:<id>, agent:<id>:pid, agent:<id>:health
-- ARGV[1]: this worker's id   ARGV[2]: now   ARGV[3]: TTL of the session keys
-- ARGV[4..]: per session, in the order of its keys: id, pid, the number of field/value pairs
--            n, then n pairs (without status and workerId)
-- Last KEY and ARGV: the event stream and its bound (session_events.lua): `ready` for a
-- session whose status is written again.
-- Returns the number of sessions restored.
local me, now, ttl = ARGV[1], ARGV[2], ARGV[3]
local restored = 0
local i, k = 4, 4
while i <= OWN_ARGS do
    local id, pid, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    local state, pid_key, health = KEYS[k], KEYS[k + 1], KEYS[k + 2]
    local current = redis.call('HMGET', state, 'workerId', 'status')
    if not current[1] or current[1] == me then
        local fields = { 'workerId', me, 'lastActive', now }
        for j = i + 3, i + 2 + 2 * n do
            fields[#fields + 1] = ARGV[j]
        end
        local status = current[2]
        if not status or status == 'starting' or status == 'ready' then
            fields[#fields + 1] = 'status'
            fields[#fields + 1] = 'ready'
            redis.call('SREM', KEYS[2], id)
            redis.call('SADD', KEYS[3], id)
            if status ~= 'ready' then
                session_event(id, 'ready', me)
            end
        end
        redis.call('HSET', state, unpack(fields))
        redis.call('EXPIRE', state, ttl)
        redis.call('SET', pid_key, pid, 'EX', ttl)
        redis.call('HSET', health, 'last_check', now, 'status', 'alive')
        redis.call('EXPIRE', health, ttl)
        redis.call('ZADD', KEYS[1], now, id)
        restored = restored + 1
    end
    i = i + 3 + 2 * n
    k = k + 3
end
return restored
