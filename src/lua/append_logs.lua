-- Append agent output lines to agent:<id>:logs, keeping the last N, for many sessions at once.
--
-- Lines are shipped asynchronously, so the last lines of an agent can arrive after its session
-- was removed (the sweep ran, or the orchestrator deleted it). Appending only while
-- session:<id> exists keeps them from resurrecting a removed session's log key, and the log
-- key takes the record's remaining TTL, so an ended session's logs never outlive its record.
--
-- KEYS: per session, two keys: session:<id>, agent:<id>:logs
-- ARGV[1]: lines to keep per session
-- ARGV[2]: TTL of the log key when the record has none, in seconds
-- ARGV[3..]: per session, in the order of its keys: the number of lines n, then n lines
-- Returns the number of lines appended.
local keep, ttl = tonumber(ARGV[1]), ARGV[2]
local appended = 0
local i = 3
for k = 1, #KEYS, 2 do
    local state, key = KEYS[k], KEYS[k + 1]
    local n = tonumber(ARGV[i])
    local left = redis.call('PTTL', state)
    if left == -1 or left > 0 then
        local length = 0
        for first = i + 1, i + n, 1000 do
            length = redis.call('RPUSH', key, unpack(ARGV, first, math.min(first + 999, i + n)))
        end
        -- Most agents print a few lines: trim only once the list is over the limit.
        if length > keep then
            redis.call('LTRIM', key, -keep, -1)
        end
        if left > 0 then
            redis.call('PEXPIRE', key, left)
        else
            redis.call('EXPIRE', key, ttl)
        end
        appended = appended + n
    end
    i = i + 1 + n
end
return appended
