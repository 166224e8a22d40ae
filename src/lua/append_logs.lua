-- Append agent output lines to agent:<id>:logs, keeping the last N, for many sessions at once.
--
-- Lines are shipped asynchronously, so the last lines of an agent can arrive after its session
-- was removed (its agent exited, the sweep ran, or the orchestrator deleted it). Appending
-- only while session:<id> exists keeps them from resurrecting a removed session's log key.
--
-- ARGV[1]: lines to keep per session
-- ARGV[2]: TTL of the log key, in seconds
-- ARGV[3..]: groups of: session id, number of lines n, then n lines
-- Returns the number of lines appended.
local keep, ttl = tonumber(ARGV[1]), ARGV[2]
local appended = 0
local i = 3
while i <= #ARGV do
    local id, n = ARGV[i], tonumber(ARGV[i + 1])
    if redis.call('EXISTS', 'session:' .. id) == 1 then
        local key = 'agent:' .. id .. ':logs'
        local length = 0
        for first = i + 2, i + 1 + n, 1000 do
            length = redis.call('RPUSH', key, unpack(ARGV, first, math.min(first + 999, i + 1 + n)))
        end
        -- Most agents print a few lines: trim only once the list is over the limit.
        if length > keep then
            redis.call('LTRIM', key, -keep, -1)
        end
        redis.call('EXPIRE', key, ttl)
        appended = appended + n
    end
    i = i + 2 + n
end
return appended
