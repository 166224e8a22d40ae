-- Read a session's config and claim the session for this worker, marking it `starting`,
-- unless another live worker owns it or the session has ended. One round trip per attempt.
--
-- Config (contract §1): `session:<id>:config` only, never a user-scoped key. A missing hash
-- means defaults, written here (the key is absent inside this atomic script, so this is the
-- "only if still absent" write). A key of another type is reported, not touched. The values
-- are validated by the caller, which marks the session `error` if they cannot be used.
--
-- Claim: one live agent per session across replicas. A duplicate delivery (a re-run after a
-- crash, a double enqueue past the idempotency window, two replicas) must not start a second
-- agent. The owner is `workerId` in session:<id>. Its claim stands while the session is
-- starting or ready and the owner process is alive (its presence heartbeat in the workers ZSET
-- is newer than the orphan timeout). A dead owner's agents died with it (death signal), so its
-- claim can be taken over.
--
-- Ended: the worker sets `status` only over its own values (starting, ready, and `error` from a
-- start that failed before any agent ran). A session the agent `completed`, the orchestrator
-- `terminated`, whose agent ran and exited (an exit is recorded), or with a status we do not
-- know, is over: no agent is started for it. A job that claimed its session before (this
-- worker's earlier attempt, or any delivery of the job on any replica: recorded in the job's
-- own meta hash, which the orchestrator never touches) whose record is now gone was ended by
-- the orchestrator meanwhile: it is not recreated.
--
-- Writes only what changes: `createdAt` for a new session, the fields of an earlier end or
-- failure removed only if present, the id moved out of `session:ready` only if it was there.
--
-- KEYS[1]: session:<id>          KEYS[2]: session:<id>:config
-- KEYS[3]: session:starting      KEYS[4]: session:ready
-- KEYS[5]: the heartbeat index   KEYS[6]: agent-worker:workers (worker id -> presence)
-- KEYS[7]: agent:<id>:logfile    KEYS[8]: the legacy cold-start counter
-- KEYS[9]: the job's meta hash (<queue>:meta:<task id>)
-- ARGV[1]: this worker's id      ARGV[2]: now (unix seconds)
-- ARGV[3]: presence older than this means the owner is dead
-- ARGV[4]: TTL of the session keys
-- ARGV[5]: session id            ARGV[6]: task id
-- ARGV[7]: user id ('' for none) ARGV[8]: default voice
-- ARGV[9]: log file path ('' for none)   ARGV[10]: 1 to count a cold start
-- ARGV[11]: 1 when KEYS[9] is a job's meta hash (0: a claim outside a job)
-- ARGV[12]: the job's start_by, unix ms on Redis's clock ('' for none)
-- ARGV[13]: the config grace, ms (the tombstone rule)   ARGV[14]: session.ended_ttl (s)
-- Last KEY and ARGV: the event stream and its bound (session_events.lua). A `starting` event
-- is appended when the claim changes the status or the owner (not on a retry's re-claim).
-- Returns {1, previous owner or '', 'stored' | 'default', {config field, value, ...},
-- enqueued} when claimed (enqueued: the job meta's `enqueued_at`, unix ms on Redis's clock as
-- the producer recorded it, or ''); {0, owner, status} when another live worker holds it;
-- {2, status} when the session has ended ('' when its record is gone); {-1, type} when the
-- config key is not a hash; {3, kind, reason} when the start is refused (below).
--
-- Refused starts (contract version 2), decided here on Redis's clock (TIME), after the checks
-- above (an ended session stays ended, another live worker's start stands):
-- * start_expired: now is past the job's start_by. Nobody waits for this agent any more. The
--   session is recorded as a start that failed (created like a claim would: status `error`
--   with the reason saying how late, endedAt, out of the state sets and the heartbeat index,
--   TTL at most ended_ttl) and an `error` event says so, so waiters fail at once.
-- * config_missing (the tombstone rule): session:<id>:config is missing, and the job's meta
--   says it was enqueued (enqueued_at, Redis ms) longer ago than the grace. Producers write
--   the config before the job, so it was deleted: the orchestrator ended the session. No
--   default config is written and no agent started. A record still there is marked `error`
--   as above; a record already gone is not recreated (as end_session.lua), but the `error`
--   event is appended so a waiter fails at once. A job without enqueued_at (a version 1
--   producer) keeps the old rule: defaults.
-- Neither counts a cold start nor writes the job's sessionClaimedAt.
local me, now, ttl = ARGV[1], ARGV[2], ARGV[4]

local current = redis.call('HMGET', KEYS[1], 'workerId', 'status', 'createdAt', 'error',
    'endedAt', 'exitCode', 'exitSignal', 'stopReason')
local owner, status = current[1], current[2]
local has_meta = ARGV[11] == '1'
local claimed_before = has_meta and redis.call('HEXISTS', KEYS[9], 'sessionClaimedAt') == 1
if claimed_before and redis.call('EXISTS', KEYS[1]) == 0 then
    return { 2, '' }
end
local ran = current[6] or current[7]
if status and status ~= 'starting' and status ~= 'ready' and (status ~= 'error' or ran) then
    return { 2, status }
end
if owner and owner ~= me and (status == 'starting' or status == 'ready') then
    local seen = redis.call('ZSCORE', KEYS[6], owner)
    if seen and tonumber(seen) > tonumber(ARGV[3]) then
        return { 0, owner, status }
    end
end

local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- `fields` of the record plus the job's user and, on a new record, its creation time.
local function with_owner(fields)
    if ARGV[7] ~= '' then
        fields[#fields + 1] = 'userId'
        fields[#fields + 1] = ARGV[7]
    end
    if not current[3] then
        fields[#fields + 1] = 'createdAt'
        fields[#fields + 1] = now
    end
    return fields
end

-- Records a refused start (see the header) and returns its reply.
local function refuse(kind, reason, recreate)
    local exists = redis.call('EXISTS', KEYS[1]) == 1
    if exists or recreate then
        local fields = with_owner({ 'status', 'error', 'error', reason, 'workerId', me,
            'taskId', ARGV[6], 'lastActive', now, 'endedAt', now })
        redis.call('HSET', KEYS[1], unpack(fields))
        redis.call('SREM', KEYS[3], ARGV[5])
        redis.call('SREM', KEYS[4], ARGV[5])
        redis.call('ZREM', KEYS[5], ARGV[5])
        local left = redis.call('TTL', KEYS[1])
        if left < 0 or left > tonumber(ARGV[14]) then
            redis.call('EXPIRE', KEYS[1], ARGV[14])
        end
    end
    session_event(ARGV[5], 'error', me, reason)
    return { 3, kind, reason }
end

if ARGV[12] ~= '' and now_ms > tonumber(ARGV[12]) then
    local late = now_ms - tonumber(ARGV[12])
    return refuse('start_expired', string.format(
        'start_expired: claimed %d ms after its start_by deadline (%s); no agent started',
        late, ARGV[12]), true)
end

local config = redis.pcall('HGETALL', KEYS[2])
if config.err then
    return { -1, redis.call('TYPE', KEYS[2]).ok }
end
if #config == 0 and has_meta then
    local enqueued_at = tonumber(redis.call('HGET', KEYS[9], 'enqueued_at') or '')
    if enqueued_at and now_ms - enqueued_at > tonumber(ARGV[13]) then
        return refuse('config_missing', string.format(
            'config_missing: %s is absent %d ms after the job was enqueued (deleted: the ' ..
            'orchestrator ended the session); no agent started with the default voice',
            KEYS[2], now_ms - enqueued_at), false)
    end
end
local source = 'stored'
if #config == 0 then
    source = 'default'
    config = { 'voiceId', ARGV[8], 'userName', ARGV[7], 'updatedAt', now }
    redis.call('HSET', KEYS[2], unpack(config))
    redis.call('EXPIRE', KEYS[2], ttl)
end
local voice = ''
for i = 1, #config, 2 do
    if config[i] == 'voiceId' then
        voice = config[i + 1]
    end
end

local fields = with_owner({ 'status', 'starting', 'workerId', me, 'lastActive', now,
    'voiceId', voice, 'taskId', ARGV[6] })
if ARGV[9] ~= '' then
    fields[#fields + 1] = 'logFile'
    fields[#fields + 1] = ARGV[9]
    redis.call('SET', KEYS[7], ARGV[9], 'EX', ttl)
end
redis.call('HSET', KEYS[1], unpack(fields))
-- A failed or ended earlier incarnation leaves its error and exit behind.
local stale = {}
local names = { [4] = 'error', [5] = 'endedAt', [6] = 'exitCode', [7] = 'exitSignal',
    [8] = 'stopReason' }
for i = 4, 8 do
    if current[i] then
        stale[#stale + 1] = names[i]
    end
end
if #stale > 0 then
    redis.call('HDEL', KEYS[1], unpack(stale))
end
redis.call('EXPIRE', KEYS[1], ttl)
if status == 'ready' then
    redis.call('SREM', KEYS[4], ARGV[5])
end
redis.call('SADD', KEYS[3], ARGV[5])
redis.call('ZADD', KEYS[5], now, ARGV[5])
if ARGV[10] == '1' then
    redis.call('INCR', KEYS[8])
end
if has_meta and not claimed_before then
    redis.call('HSET', KEYS[9], 'sessionClaimedAt', now)
end
local enqueued = has_meta and redis.call('HGET', KEYS[9], 'enqueued_at')
if status ~= 'starting' or owner ~= me then
    -- The event's ts is the claim; with the producer's enqueue beside it, the queue wait.
    session_event(ARGV[5], 'starting', me, nil, enqueued and { 'enqueued_ms', enqueued } or nil)
end
return { 1, owner or '', source, config, enqueued or '' }
