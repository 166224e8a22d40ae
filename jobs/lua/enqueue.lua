-- Enqueue agent-start jobs in the apalis-redis 1.0 wire format, straight onto the ready list.
--
-- apalis-redis's own push puts every job in the scheduled set, and more than ~8,000 due ids
-- there crash every worker's fetch; it also drops idempotency keys at once when no TTL is set.
-- This script writes the same records a worker expects (data, meta with attempts /
-- max_attempts / status, ready list) and claims each idempotency key with a TTL, so a session
-- enqueued twice is stored once.
--
-- KEYS[1]: <queue>:data      (HASH task id -> payload)
-- KEYS[2]: <queue>:active    (LIST of ready task ids)
-- ARGV[1]: meta key prefix   (<queue>:meta; the hash of a task is <prefix>:<task id>)
-- ARGV[2]: idempotency key prefix (<queue>:idempotency)
-- ARGV[3]: idempotency TTL in seconds (> 0)
-- ARGV[4]: max_attempts written into each task's meta
-- ARGV[5]: wake-up channel, published to once when anything was pushed
-- ARGV[6..]: triples of task id, payload, idempotency key ('' for none)
--
-- Returns a flat array: for each job, 1 and its new task id, or 0 and the task id that already
-- holds its idempotency key.
local meta_prefix = ARGV[1]
local idem_prefix = ARGV[2]
local idem_ttl = ARGV[3]
local max_attempts = ARGV[4]
local wake_channel = ARGV[5]

local out = {}
local ready = {}

for i = 6, #ARGV, 3 do
    local task_id, payload, idem = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local holder = nil
    if idem ~= '' then
        local idem_key = idem_prefix .. ':' .. idem
        if not redis.call('SET', idem_key, task_id, 'NX', 'EX', idem_ttl) then
            holder = redis.call('GET', idem_key)
        end
    end
    if holder then
        out[#out + 1] = 0
        out[#out + 1] = holder
    else
        redis.call('HSET', KEYS[1], task_id, payload)
        redis.call('HSET', meta_prefix .. ':' .. task_id,
            'attempts', 0, 'max_attempts', max_attempts, 'status', 'Pending',
            'idempotency_key', idem)
        ready[#ready + 1] = task_id
        out[#out + 1] = 1
        out[#out + 1] = task_id
    end
end

-- RPUSH in chunks: unpack() of more than ~8,000 values fails.
for first = 1, #ready, 1000 do
    redis.call('RPUSH', KEYS[2], unpack(ready, first, math.min(first + 999, #ready)))
end
if #ready > 0 then
    redis.call('PUBLISH', wake_channel, #ready)
end
return out
