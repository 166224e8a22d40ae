-- Delete finished jobs: their id from the indexes, their data and their meta.
--
-- Only jobs whose meta still says they are finished (Done, or Killed for dead jobs) are
-- deleted: a job that was retried meanwhile (back to Pending) or is waiting for a retry in the
-- scheduled set (Failed) keeps everything.
--
-- KEYS[1]: the index ZSET (<queue>:done-at or <queue>:dead-at)
-- KEYS[2]: the SET the ids also live in (<queue>:dead), or the same index for done jobs
-- KEYS[3]: <queue>:data
-- ARGV[1]: meta key prefix
-- ARGV[2]: the finished status to require (Done or Killed)
-- ARGV[3..]: task ids
-- Returns the number deleted.
local deleted = 0
for i = 3, #ARGV do
    local id = ARGV[i]
    local meta = ARGV[1] .. ':' .. id
    local status = redis.call('HGET', meta, 'status')
    redis.call('ZREM', KEYS[1], id)
    if status == ARGV[2] or not status then
        redis.call('SREM', KEYS[2], id)
        redis.call('HDEL', KEYS[3], id)
        redis.call('DEL', meta)
        deleted = deleted + 1
    end
end
return deleted
