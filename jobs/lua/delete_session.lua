-- End a session from the orchestrator's side: delete the session's keys and its entries in the
-- state sets, in one atomic step, exactly as the orchestrator's end-of-session handler does.
--
-- What is deleted is the documented list (contract §5, the sweep's list): session:<id>,
-- session:<id>:config, agent:<id>:pid, agent:<id>:logs, agent:<id>:health, agent:<id>:logfile,
-- and the id in session:starting and session:ready.
--
-- What stays, on purpose:
-- - the id's entry in the worker's heartbeat index (agent-worker:session-heartbeats). A
--   record gone while its index entry is there is how the owning worker tells "ended by the
--   orchestrator" (it stops the agent within one session.heartbeat_interval, then removes the
--   entry itself) from "lost by Redis" (both gone: it writes the record again). Deleting the
--   entry here would make the worker restore the session instead of stopping it.
-- - the queue's idempotency key (<queue>:idempotency:session:<id>): the same session id is not
--   started again within the session TTL (jobs/README.md).
--
-- Idempotent: a second call finds nothing and returns 0.
--
-- KEYS[1..6]: session:<id>, session:<id>:config, agent:<id>:pid, agent:<id>:logs,
--             agent:<id>:health, agent:<id>:logfile
-- KEYS[7]: session:starting   KEYS[8]: session:ready
-- ARGV[1]: the session id
-- Returns the number of keys deleted plus set entries removed.
local removed = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
removed = removed + redis.call('SREM', KEYS[7], ARGV[1])
removed = removed + redis.call('SREM', KEYS[8], ARGV[1])
return removed
