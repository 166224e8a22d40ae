-- Prologue of every script that changes a session's status (claim_session, mark_ready,
-- heartbeat, end_session, remove_sessions, restore_sessions): the change goes to the event
-- stream `agent-worker:events` in the same atomic call that records it, so a reader never
-- sees a status without its event or an event without its status, and no round trip is added.
-- The format is version 1 of jobs/README.md's "Session events".
--
-- The scripts are loaded as this file followed by their own text (session.rs). To leave each
-- script's own KEYS and ARGV layout as it was, the stream key is always the LAST key and its
-- bound (approximate MAXLEN, `events.max_len`) the LAST argument; scripts that walk a
-- variable tail of ARGV stop at OWN_ARGS instead of #ARGV.
local EVENTS_KEY, EVENTS_MAX_LEN = KEYS[#KEYS], ARGV[#ARGV]
local OWN_ARGS = #ARGV - 1

-- Appends one event: session id, status, the worker that owns the session ('' when none is
-- known), Redis's time in milliseconds (one clock for every writer, and the one the stream's
-- entry ids are made of), when given, the reason, and then `extra`'s field/value pairs (the
-- `ready` event's phase times). `MAXLEN ~` trims whole stream nodes, so
-- the length stays within one node (100 entries by default) of the bound at O(1) cost.
local function session_event(id, status, worker, reason, extra)
    local time = redis.call('TIME')
    local ms = time[1] .. string.format('%03d', math.floor(tonumber(time[2]) / 1000))
    local fields = { 'session_id', id, 'status', status, 'worker_id', worker or '', 'ts', ms }
    if reason and reason ~= '' then
        fields[#fields + 1] = 'reason'
        fields[#fields + 1] = reason
    end
    for i = 1, #(extra or {}) do
        fields[#fields + 1] = extra[i]
    end
    redis.call('XADD', EVENTS_KEY, 'MAXLEN', '~', EVENTS_MAX_LEN, '*', unpack(fields))
end
