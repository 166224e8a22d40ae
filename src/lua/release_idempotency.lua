-- Release a session's idempotency key after its job failed for good, so the orchestrator can
-- start the session again at once instead of waiting out the key's TTL. Only if the key still
-- holds this job's task id: a newer job of the session keeps its claim.
--
-- KEYS[1]: <queue>:idempotency:session:<id>
-- ARGV[1]: the failed job's task id
-- Returns 1 when released.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
