-- Hand back the jobs a dead worker of this process had fetched, right away.
--
-- apalis-redis re-queues a dead worker's jobs only after its orphan timeout, and re-queues
-- them blindly: a job whose data or meta cannot be parsed fails every fetch that reads it. We
-- know our own worker is dead the moment it returns an error, so we re-queue its jobs at once,
-- and move any job that would break a fetch to the dead set with the reason.
--
-- KEYS[1]: <queue>:inflight:<dead worker>
-- KEYS[2]: <queue>:active
-- KEYS[3]: <queue>:data
-- KEYS[4]: <queue>:dead
-- KEYS[5]: <queue>:workers
-- KEYS[6]: <queue>:workers:metadata:<dead worker> (apalis-redis never deletes it: one leaked
--          hash per run otherwise)
-- ARGV[1]: meta key prefix (<queue>:meta)
-- ARGV[2]: dead worker name
-- ARGV[3]: now (unix seconds)
-- Returns {re-queued, quarantined}.
local statuses = { Pending = true, Queued = true, Running = true, Done = true, Failed = true, Killed = true }
local requeued, quarantined = {}, 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local meta_key = ARGV[1] .. ':' .. id
    local meta = redis.call('HMGET', meta_key, 'attempts', 'max_attempts', 'status')
    local problem = nil
    if redis.call('HEXISTS', KEYS[3], id) == 0 then
        problem = 'job data is missing from ' .. KEYS[3]
    elseif not (meta[1] and tonumber(meta[1])) then
        problem = meta_key .. ' has no numeric attempts field'
    elseif not (meta[2] and tonumber(meta[2])) then
        problem = meta_key .. ' has no numeric max_attempts field'
    elseif not (meta[3] and statuses[meta[3]]) then
        problem = meta_key .. ' has no valid status field'
    end
    if problem then
        redis.call('SADD', KEYS[4], id)
        redis.call('HSET', meta_key, 'status', 'Killed', 'done_at', ARGV[3],
            'result', cjson.encode({ Err = 'unreadable job: ' .. problem }))
        quarantined = quarantined + 1
    else
        requeued[#requeued + 1] = id
    end
end
-- LPUSH puts them back at the head, in their original order: they were fetched first.
for first = #requeued, 1, -1000 do
    local chunk = {}
    for i = first, math.max(1, first - 999), -1 do
        chunk[#chunk + 1] = requeued[i]
    end
    redis.call('LPUSH', KEYS[2], unpack(chunk))
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[5], ARGV[2])
redis.call('DEL', KEYS[6])
return { #requeued, quarantined }
