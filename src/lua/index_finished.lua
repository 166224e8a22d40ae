-- Index finished jobs by the time they finished, so retention trims by age without scanning.
--
-- apalis-redis only adds finished ids to the done / dead SETs, which carry no time and never
-- shrink. Done ids are moved (SPOP) into <queue>:done-at, a ZSET id -> done_at, so the done
-- SET stays a small inbox. Dead ids stay in the dead SET (the dead list and retries read it)
-- and are added to <queue>:dead-at as well.
--
-- KEYS[1]: <queue>:done      KEYS[2]: <queue>:done-at
-- KEYS[3]: <queue>:dead      KEYS[4]: <queue>:dead-at
-- ARGV[1]: meta key prefix   ARGV[2]: now (fallback when a job has no done_at)
-- ARGV[3]: most ids per call
-- Returns {done ids indexed, dead ids indexed}.
local prefix, now, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local function finished_at(id)
    return tonumber(redis.call('HGET', prefix .. ':' .. id, 'done_at')) or now
end
local done = redis.call('SPOP', KEYS[1], batch)
for _, id in ipairs(done) do
    redis.call('ZADD', KEYS[2], finished_at(id), id)
end
local dead = 0
if redis.call('SCARD', KEYS[3]) ~= redis.call('ZCARD', KEYS[4]) then
    -- The dead SET is bounded by retention (dead_max), so a full pass is cheap.
    for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
        dead = dead + redis.call('ZADD', KEYS[4], 'NX', finished_at(id), id)
    end
end
return { #done, dead }
