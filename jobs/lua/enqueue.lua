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
-- KEYS[3..]: pairs per job, in the order of the triples: its meta hash
--            (<queue>:meta:<task id>) and its idempotency key
--            (<queue>:idempotency:<idempotency key>; any name, untouched, when it has none)
-- ARGV[1]: idempotency TTL in seconds (> 0)
-- ARGV[2]: max_attempts written into each task's meta
-- ARGV[3]: wake-up channel, published to once when anything was pushed
-- ARGV[4..]: triples of task id, payload, idempotency key ('' for none): job n (from 0) is
--            ARGV[4 + 3n .. 6 + 3n] with KEYS[3 + 2n] and KEYS[4 + 2n]
--
-- Each meta also gets `enqueued_at` (unix ms, Redis's TIME), which apalis-redis ignores.
--
-- Returns a flat array: for each job, 1 and its new task id, or 0 and the task id that already
-- holds its idempotency key.
--
-- Redis does not roll a script back when a command fails. The failure a session can cause is
-- an idempotency key holding something other than a string (GET on it fails): all keys are
-- claimed first, and on that error the claims of this call are released and an error naming
-- the key is returned, so nothing of the call is left behind. (A queue key of the wrong type,
-- <queue>:data or <queue>:active, breaks the whole queue; a batch then stops part-way.)
--
-- Cost notes (callgrind on redis-server 7.0): each redis.call costs far more than the Lua
-- around it, so the data hash is written with one HSET per batch rather than one per job, and
-- a single job (the orchestrator's usual call) skips the batch tables altogether. Numbers are
-- passed to redis.call as strings ('0', '1'): Redis formats a Lua number with snprintf.
local call = redis.call
local argv, keys = ARGV, KEYS
local data_key, active_key = keys[1], keys[2]

-- enqueued_at in each meta (contract version 2): Redis's clock in unix milliseconds, the one
-- clock the worker measures queue waits and config grace periods on.
local time = call('TIME')
local enqueued_at = time[1] .. string.format('%03d', math.floor(tonumber(time[2]) / 1000))

-- The task id holding `idem_key`, or an error reply naming the key.
local function holder_of(idem_key)
    local ok, holder = pcall(call, 'GET', idem_key)
    if ok then
        return holder
    end
    return nil, redis.error_reply('WRONGTYPE idempotency key ' .. idem_key ..
        ' holds a ' .. call('TYPE', idem_key)['ok'] .. ', not a task id')
end

if #argv == 6 then
    local task_id, idem = argv[4], argv[6]
    if idem ~= '' then
        local idem_key = keys[4]
        if not call('SET', idem_key, task_id, 'NX', 'EX', argv[1]) then
            local holder, err = holder_of(idem_key)
            return err or {0, holder}
        end
    end
    call('HSET', data_key, task_id, argv[5])
    call('HSET', keys[3],
        'attempts', '0', 'max_attempts', argv[2], 'status', 'Pending',
        'idempotency_key', idem, 'enqueued_at', enqueued_at)
    call('RPUSH', active_key, task_id)
    call('PUBLISH', argv[3], '1')
    return {1, task_id}
end

local idem_ttl = argv[1]
local max_attempts = argv[2]

-- First every idempotency key: a failure here can still be undone.
local out, n = {}, 0
local claimed, c = {}, 0 -- idempotency keys set by this call
local fresh, k = {}, 0 -- ARGV index of each job to push
local metas = {} -- meta key of each job to push
local key = 3 -- KEYS index of the current job's meta key
for i = 4, #argv, 3 do
    local task_id, idem = argv[i], argv[i + 2]
    local holder = false
    if idem ~= '' then
        local idem_key = keys[key + 1]
        if call('SET', idem_key, task_id, 'NX', 'EX', idem_ttl) then
            c = c + 1
            claimed[c] = idem_key
        else
            local err
            holder, err = holder_of(idem_key)
            if err then
                for first = 1, c, 1000 do
                    call('DEL', unpack(claimed, first, math.min(first + 999, c)))
                end
                return err
            end
        end
    end
    if holder then
        out[n + 1] = 0
        out[n + 2] = holder
    else
        out[n + 1] = 1
        out[n + 2] = task_id
        k = k + 1
        fresh[k] = i
        metas[k] = keys[key]
    end
    n = n + 2
    key = key + 2
end

-- Then the jobs to push.
local fields, f = {}, 0 -- task id, payload, ... for the data hash
local ready = {}
for j = 1, k do
    local i = fresh[j]
    local task_id = argv[i]
    call('HSET', metas[j],
        'attempts', '0', 'max_attempts', max_attempts, 'status', 'Pending',
        'idempotency_key', argv[i + 2], 'enqueued_at', enqueued_at)
    fields[f + 1] = task_id
    fields[f + 2] = argv[i + 1]
    f = f + 2
    ready[j] = task_id
end

-- HSET and RPUSH in chunks: unpack() of more than ~8,000 values fails.
for first = 1, f, 2000 do
    call('HSET', data_key, unpack(fields, first, math.min(first + 1999, f)))
end
for first = 1, k, 1000 do
    call('RPUSH', active_key, unpack(ready, first, math.min(first + 999, k)))
end
if k > 0 then
    call('PUBLISH', argv[3], k)
end
return out
