-- Move due ids from the scheduled set to the ready list, at most ARGV[2] per call.
--
-- apalis-redis's fetch promotes *every* due id in one unpack(); past ~8,000 that fails with
-- "too many results to unpack" and every worker's fetch crashes until the set is drained.
-- Running this first, in bounded chunks, keeps the set below that size.
--
-- KEYS[1]: <queue>:scheduled
-- KEYS[2]: <queue>:active
-- ARGV[1]: now (unix seconds)
-- ARGV[2]: most ids to move
-- Returns the number moved.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids > 0 then
    redis.call('RPUSH', KEYS[2], unpack(ids))
    redis.call('ZREM', KEYS[1], unpack(ids))
end
return #ids
