-- Hand back the jobs a dead worker of this process had fetched, right away.
--
-- apalis-redis re-queues a dead worker's jobs only after its orphan timeout, and re-queues
-- them blindly: a job whose data or meta cannot be parsed fails every fetch that reads it. We
-- know our own worker is dead the moment it returns an error, so we re-queue its jobs at once,
-- and move any job that would break a fetch to the dead set with the reason.
--
-- The same goes for the next jobs of the ready list: when Redis lost the data hash (eviction,
-- a failover), every waiting job is unreadable, and each would otherwise kill one run of the
-- worker in turn, every restart waiting out a longer back-off while good jobs wait behind
-- them. So the first ARGV[4] ids of the ready list are checked too: those with a meta hash
-- (a job, as its producer wrote it) that cannot be fetched go to the dead set with the
-- reason, and the rest keep their order. An id without any meta hash is not known to be a job
-- at all: it is left to the fetch, as before (it ends one run, then the inflight pass below
-- quarantines it).
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
-- ARGV[4]: how many ids at the head of the ready list to check
-- Returns {re-queued, quarantined}.
local statuses = { Pending = true, Queued = true, Running = true, Done = true, Failed = true, Killed = true }
local requeued, quarantined = {}, 0

-- Why a job cannot be fetched, or nil.
local function problem_of(id)
    local meta_key = ARGV[1] .. ':' .. id
    local meta = redis.call('HMGET', meta_key, 'attempts', 'max_attempts', 'status')
    if redis.call('HEXISTS', KEYS[3], id) == 0 then
        return 'job data is missing from ' .. KEYS[3]
    elseif not (meta[1] and tonumber(meta[1])) then
        return meta_key .. ' has no numeric attempts field'
    elseif not (meta[2] and tonumber(meta[2])) then
        return meta_key .. ' has no numeric max_attempts field'
    elseif not (meta[3] and statuses[meta[3]]) then
        return meta_key .. ' has no valid status field'
    end
    return nil
end

local function quarantine(id, problem)
    redis.call('SADD', KEYS[4], id)
    redis.call('HSET', ARGV[1] .. ':' .. id, 'status', 'Killed', 'done_at', ARGV[3],
        'result', cjson.encode({ Err = 'unreadable job: ' .. problem }))
    quarantined = quarantined + 1
end

-- Pushes `ids` back at the head of the ready list, in their order.
local function push_front(ids)
    for first = #ids, 1, -1000 do
        local chunk = {}
        for i = first, math.max(1, first - 999), -1 do
            chunk[#chunk + 1] = ids[i]
        end
        redis.call('LPUSH', KEYS[2], unpack(chunk))
    end
end

-- The head of the ready list first: the dead worker's jobs go back in front of it.
local check = tonumber(ARGV[4])
local head = check > 0 and redis.call('LRANGE', KEYS[2], 0, check - 1) or {}
local readable, unreadable = {}, 0
for _, id in ipairs(head) do
    local problem = nil
    if redis.call('EXISTS', ARGV[1] .. ':' .. id) == 1 then
        problem = problem_of(id)
    end
    if problem then
        quarantine(id, problem)
        unreadable = unreadable + 1
    else
        readable[#readable + 1] = id
    end
end
if unreadable > 0 then
    redis.call('LTRIM', KEYS[2], #head, -1)
    push_front(readable)
end

for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local problem = problem_of(id)
    if problem then
        quarantine(id, problem)
    else
        requeued[#requeued + 1] = id
    end
end
-- Back at the head, in their original order: they were fetched first.
push_front(requeued)
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[5], ARGV[2])
redis.call('DEL', KEYS[6])
return { #requeued, quarantined }
