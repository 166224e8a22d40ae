-- Put dead jobs back on the ready list, as new: attempts 0, status Pending, result cleared.
--
-- KEYS[1]: <queue>:dead   KEYS[2]: <queue>:dead-at   KEYS[3]: <queue>:active
-- KEYS[4]: <queue>:data
-- KEYS[5..]: the meta hash of each task (<queue>:meta:<task id>), in the order of the ids
-- ARGV[1]: wake channel
-- ARGV[2..]: task ids (ARGV[1 + n] is the task of KEYS[4 + n])
-- Returns the ids re-queued (ids not in the dead set, or without data, are skipped).
local requeued = {}
for i = 2, #ARGV do
    local id = ARGV[i]
    if redis.call('SISMEMBER', KEYS[1], id) == 1 and redis.call('HEXISTS', KEYS[4], id) == 1 then
        local meta = KEYS[i + 3]
        redis.call('SREM', KEYS[1], id)
        redis.call('ZREM', KEYS[2], id)
        redis.call('HSET', meta, 'status', 'Pending', 'attempts', 0)
        redis.call('HDEL', meta, 'result', 'done_at', 'locked_at', 'locked_by')
        redis.call('RPUSH', KEYS[3], id)
        requeued[#requeued + 1] = id
    end
end
if #requeued > 0 then
    redis.call('PUBLISH', ARGV[1], #requeued)
end
return requeued
