-- Forget workers silent for a long time: their presence entry, their agent count, their info
-- and their warm-pool count.
--
-- Every worker process has its own id, so every restart or deploy leaves one entry in the
-- presence ZSET and one field in each of the HASHes below that nothing else removes. An entry
-- this old is long past the orphan timeout (its sessions could be taken over long ago), so removing
-- it changes no decision; it only stops `status` listing the dead and Redis growing with them.
-- The read and the removal are one step: a worker that came back in between keeps its entry.
--
-- KEYS[1]: agent-worker:workers   KEYS[2]: agent-worker:worker-agents
-- KEYS[3]: agent-worker:worker-info
-- KEYS[4]: agent-worker:worker-warm
-- ARGV[1]: forget presence at or before this unix time   ARGV[2]: at most this many per call
-- Returns the number forgotten.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids > 0 then
    redis.call('ZREM', KEYS[1], unpack(ids))
    redis.call('HDEL', KEYS[2], unpack(ids))
    redis.call('HDEL', KEYS[3], unpack(ids))
    redis.call('HDEL', KEYS[4], unpack(ids))
end
return #ids
