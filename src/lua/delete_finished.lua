-- Delete finished jobs: their id from the indexes, their data and their meta.
--
-- Done jobs are deleted only while their meta still says Done; dead jobs only while they are
-- still in the dead set (apalis-redis marks them Killed, or Failed after its 25th attempt). A
-- job that was retried meanwhile (`dead retry`: back to Pending, out of the dead set) or is
-- waiting for a retry in the scheduled set keeps everything.
--
-- KEYS[1]: the index ZSET (<queue>:done-at or <queue>:dead-at)
-- KEYS[2]: the SET the ids also live in (<queue>:dead), or the same index for done jobs
-- KEYS[3]: <queue>:data
-- KEYS[4..]: the meta hash of each task (<queue>:meta:<task id>), in the order of the ids
-- ARGV[1]: `done` or `dead`
-- ARGV[2..]: task ids (ARGV[1 + n] is the task of KEYS[3 + n])
-- Returns the number deleted.
local deleted = 0
for i = 2, #ARGV do
    local id = ARGV[i]
    local meta = KEYS[i + 2]
    local finished
    if ARGV[1] == 'dead' then
        finished = redis.call('SISMEMBER', KEYS[2], id) == 1
    else
        local status = redis.call('HGET', meta, 'status')
        finished = status == 'Done' or not status
    end
    redis.call('ZREM', KEYS[1], id)
    if finished then
        redis.call('SREM', KEYS[2], id)
        redis.call('HDEL', KEYS[3], id)
        redis.call('DEL', meta)
        deleted = deleted + 1
    end
end
return deleted
