-- Record a failed start attempt that will be retried: `lastError`, while the status stays
-- `starting` (an orchestrator may give up on `error`). Only if this worker still owns the
-- session and its record exists: a record the orchestrator deleted meanwhile is not recreated
-- (the next attempt's claim then sees that the session ended).
--
-- With the legacy metrics on, the original worker's retry counter (and its start-up timeout
-- counter, when the attempt timed out) are counted here too.
--
-- KEYS[1]: session:<id>   KEYS[2]: legacy retry counter   KEYS[3]: legacy timeout counter
-- ARGV[1]: this worker's id   ARGV[2]: the error
-- ARGV[3]: 1 to count a retry   ARGV[4]: 1 to count a start-up timeout
-- Returns 1 when recorded.
if ARGV[3] == '1' then
    redis.call('INCR', KEYS[2])
end
if ARGV[4] == '1' then
    redis.call('INCR', KEYS[3])
end
if redis.call('HGET', KEYS[1], 'workerId') ~= ARGV[1] then
    return 0
end
redis.call('HSET', KEYS[1], 'lastError', ARGV[2])
return 1
