-- Depth of one apalis-redis queue, for the queue depth gauges of /metrics.
--
-- Why a script: the inflight count is a sum over one set per registered worker
-- (<queue>:inflight:<worker name>), and the names are only known from <queue>:workers. From the
-- client that is ZRANGE, then one SCARD per worker: two round trips at least, every probe tick,
-- and counts taken at different moments. Here everything is one round trip and one consistent
-- snapshot. Cost: O(registered workers) SCARDs, each O(1); the workers set holds a few names
-- per replica (dead runs are deregistered by recover_inflight.lua), so the script stays short.
-- Read-only. The per-worker keys are built here rather than passed in KEYS, as apalis-redis's
-- own scripts do: like them, this assumes one Redis, not a Cluster.
--
-- KEYS[1]: <queue>:active     LIST of ready task ids
-- KEYS[2]: <queue>:scheduled  ZSET of task ids waiting for their due time
-- KEYS[3]: <queue>:workers    ZSET of registered worker names
-- KEYS[4]: <queue>:dead       SET of failed task ids
-- KEYS[5]: <queue>:done       SET of finished task ids
-- ARGV[1]: prefix of the inflight sets, "<queue>:inflight"
--
-- Returns {ready, scheduled, inflight, dead, done}.

local inflight = 0
for _, name in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    inflight = inflight + redis.call('SCARD', ARGV[1] .. ':' .. name)
end

return {
    redis.call('LLEN', KEYS[1]),
    redis.call('ZCARD', KEYS[2]),
    inflight,
    redis.call('SCARD', KEYS[4]),
    redis.call('SCARD', KEYS[5]),
}
