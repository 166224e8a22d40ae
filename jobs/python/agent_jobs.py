#!/usr/bin/env python3
"""Python producer of agent-start jobs for agent-worker (wire contract version 1).

The twin of the Rust ``agent-jobs`` crate for the FastAPI orchestrator: it writes
``session:<id>:config`` and enqueues agent-start jobs with the very same Lua scripts and
arguments, so the records in Redis are byte-identical to the Rust producer's
(``tests/python_producer.rs`` checks that). Only needs redis-py and Python 3.11.

    import redis, agent_jobs
    r = redis.Redis.from_url("redis://127.0.0.1:6379")
    agent_jobs.write_session_config(r, "abc-123", "Craig", "alice")
    job = agent_jobs.enqueue_agent_start(r, "abc-123", user_id="alice")
    job.task_id, job.duplicate

Every input error raises ``ValueError`` (before anything is written); Redis errors are
redis-py's own exceptions.

The Lua scripts are read from ``../lua/`` next to this file when present (this repository's
``jobs/lua/*.lua``, the copy the Rust crate compiles in); a copy of this file used on its own
falls back to the identical embedded text below, which ``cargo test`` keeps equal to the files.

CLI, like ``agent-worker enqueue``:

    python3 agent_jobs.py enqueue --redis-url URL [--queue Q] --session-id ID [--user-id U]
        [--voice-id V] [--opening-line T] [--system-prompt T]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

CONTRACT_VERSION = 1
DEFAULT_QUEUE = "agent-start"
# Session TTL: lifetime of the config hash and of enqueue deduplication (4 h).
DEFAULT_TTL = 14400
# Voice the CLI writes when only --opening-line / --system-prompt are given (the worker's default).
DEFAULT_VOICE = "Ashley"
# max_attempts in each job's meta: the worker retries in-process and never hands a job back.
MAX_ATTEMPTS = 1
MAX_SESSION_ID_LEN = 128
MAX_USER_ID_BYTES = 256

_SESSION_ID_CHAR = re.compile(r"[A-Za-z0-9._-]")
_QUEUE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")

# Identical copies of jobs/lua/*.lua (byte for byte; a test compares them).
_EMBEDDED_ENQUEUE_LUA = """\
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
local argv = ARGV
local data_key, active_key = KEYS[1], KEYS[2]

-- The task id holding `idem_key`, or an error reply naming the key.
local function holder_of(idem_key)
    local ok, holder = pcall(call, 'GET', idem_key)
    if ok then
        return holder
    end
    return nil, redis.error_reply('WRONGTYPE idempotency key ' .. idem_key ..
        ' holds a ' .. call('TYPE', idem_key)['ok'] .. ', not a task id')
end

if #argv == 8 then
    local task_id, idem = argv[6], argv[8]
    if idem ~= '' then
        local idem_key = argv[2] .. ':' .. idem
        if not call('SET', idem_key, task_id, 'NX', 'EX', argv[3]) then
            local holder, err = holder_of(idem_key)
            return err or {0, holder}
        end
    end
    call('HSET', data_key, task_id, argv[7])
    call('HSET', argv[1] .. ':' .. task_id,
        'attempts', '0', 'max_attempts', argv[4], 'status', 'Pending',
        'idempotency_key', idem)
    call('RPUSH', active_key, task_id)
    call('PUBLISH', argv[5], '1')
    return {1, task_id}
end

local meta_prefix = argv[1] .. ':'
local idem_prefix = argv[2] .. ':'
local idem_ttl = argv[3]
local max_attempts = argv[4]

-- First every idempotency key: a failure here can still be undone.
local out, n = {}, 0
local claimed, c = {}, 0 -- idempotency keys set by this call
local fresh, k = {}, 0 -- ARGV index of each job to push
for i = 6, #argv, 3 do
    local task_id, idem = argv[i], argv[i + 2]
    local holder = false
    if idem ~= '' then
        local idem_key = idem_prefix .. idem
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
    end
    n = n + 2
end

-- Then the jobs to push.
local fields, f = {}, 0 -- task id, payload, ... for the data hash
local ready = {}
for j = 1, k do
    local i = fresh[j]
    local task_id = argv[i]
    call('HSET', meta_prefix .. task_id,
        'attempts', '0', 'max_attempts', max_attempts, 'status', 'Pending',
        'idempotency_key', argv[i + 2])
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
    call('PUBLISH', argv[5], k)
end
return out
"""

_EMBEDDED_WRITE_SESSION_CONFIG_LUA = """\
-- Replace a session's config hash exactly as the orchestrator writes it.
--
-- Delete first, so fields of an older config (an openingLine that is no longer set) do not
-- survive; write and set the TTL in the same atomic step, so a reader never sees a config
-- without its expiry.
--
-- KEYS[1]: session:<id>:config
-- ARGV[1]: TTL in seconds (> 0)
-- ARGV[2..]: field, value pairs
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


def _lua(name: str, embedded: str) -> str:
    """The script shipped in ../lua/ when this file sits in the repository, else the copy."""
    path = Path(__file__).resolve().parent.parent / "lua" / name
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return embedded


ENQUEUE_LUA = _lua("enqueue.lua", _EMBEDDED_ENQUEUE_LUA)
WRITE_SESSION_CONFIG_LUA = _lua("write_session_config.lua", _EMBEDDED_WRITE_SESSION_CONFIG_LUA)


@dataclass(frozen=True)
class Enqueued:
    """What happened to one enqueued job (the Rust crate's ``Enqueued``)."""

    task_id: str
    """The task holding the job: the new one, or the existing one for a duplicate."""
    duplicate: bool
    """True when the session was already enqueued within the TTL and nothing was written."""


def validate_session_id(session_id: object) -> str:
    """Returns ``session_id`` if it is 1-128 characters of ``[A-Za-z0-9._-]``.

    Mirrors ``jobs/src/session_id.rs``: the id becomes part of Redis key names, so ``*``,
    ``:``, ``{``, spaces, newlines and non-ASCII are refused.
    """
    if not isinstance(session_id, str):
        raise ValueError(f"session_id must be a string, got {type(session_id).__name__}")
    if not session_id:
        raise ValueError("session_id is empty")
    if len(session_id) > MAX_SESSION_ID_LEN:
        raise ValueError(
            f"session_id is {len(session_id)} characters long; "
            f"at most {MAX_SESSION_ID_LEN} are allowed"
        )
    for position, char in enumerate(session_id):
        if not _SESSION_ID_CHAR.fullmatch(char):
            raise ValueError(
                f"session_id contains {char!r} at position {position}; "
                "only letters, digits, '.', '_' and '-' are allowed"
            )
    return session_id


def validate_user_id(user_id: object) -> str | None:
    """Returns ``user_id`` if it is None or a string of at most 256 UTF-8 bytes."""
    if user_id is None:
        return None
    if not isinstance(user_id, str):
        raise ValueError(f"user_id must be a string or None, got {type(user_id).__name__}")
    size = len(_utf8("user_id", user_id))
    if size > MAX_USER_ID_BYTES:
        raise ValueError(
            f"user_id is {size} bytes long; at most {MAX_USER_ID_BYTES} are allowed"
        )
    return user_id


def _utf8(name: str, value: str) -> bytes:
    # Python strings may hold lone surrogates, which have no UTF-8 form (and no Rust String).
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text: {e.reason}") from None


def _validate_queue(queue: object) -> str:
    # Mirrors QueueKeys::new in jobs/src/keys.rs.
    if not isinstance(queue, str) or not _QUEUE_NAME.fullmatch(queue):
        raise ValueError(
            f"queue name {queue!r} is invalid: use 1-64 characters of letters, digits, "
            "'.', '_', '-' and ':'"
        )
    return queue


def _ttl_seconds(ttl: int) -> int:
    # Like the Rust crate: whole seconds, at least one.
    return max(1, int(ttl))


def payload_bytes(session_id: str, user_id: str | None = None) -> bytes:
    """The canonical wire bytes of a job, equal to Rust's ``AgentStart::to_wire()``.

    Compact JSON, ``session_id`` first, ``user_id`` omitted when None, non-ASCII written as
    UTF-8. ``json.dumps`` escapes exactly what serde_json escapes: ``"``, ``\\``, ``\\b``,
    ``\\f``, ``\\n``, ``\\r``, ``\\t`` by name and other control characters as lowercase
    ``\\u00xx``; DEL, ``/`` and U+2028/U+2029 stay literal in both.
    """
    job = {"session_id": validate_session_id(session_id)}
    if validate_user_id(user_id) is not None:
        job["user_id"] = user_id
    return json.dumps(job, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_task_id() -> str:
    """A ULID: 48-bit unix milliseconds + 80 random bits, 26 Crockford base32 characters."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def _text(value: bytes | str) -> str:
    # Replies are bytes unless the client was made with decode_responses=True.
    return value.decode("utf-8") if isinstance(value, bytes) else value


def write_session_config(
    r: redis.Redis,
    session_id: str,
    voice_id: str,
    user_name: str,
    opening_line: str | None = None,
    system_prompt: str | None = None,
    ttl: int = DEFAULT_TTL,
) -> None:
    """Replaces ``session:<id>:config`` and sets its TTL (seconds), atomically.

    Fields: ``voiceId``, ``userName``, ``updatedAt`` (unix seconds), then ``openingLine`` and
    ``systemPrompt`` when given. Older fields do not survive.
    """
    validate_session_id(session_id)
    fields = {"voiceId": voice_id, "userName": user_name, "updatedAt": str(int(time.time()))}
    if opening_line is not None:
        fields["openingLine"] = opening_line
    if system_prompt is not None:
        fields["systemPrompt"] = system_prompt
    args: list[int | bytes] = [_ttl_seconds(ttl)]
    for field, value in fields.items():
        if not isinstance(value, str):
            raise ValueError(f"{field} must be a string, got {type(value).__name__}")
        args += [field.encode(), _utf8(field, value)]
    script = r.register_script(WRITE_SESSION_CONFIG_LUA)
    script(keys=[f"session:{session_id}:config"], args=args)


def enqueue_agent_start(
    r: redis.Redis,
    session_id: str,
    user_id: str | None = None,
    queue: str = DEFAULT_QUEUE,
    idempotency_ttl: int = DEFAULT_TTL,
) -> Enqueued:
    """Enqueues an agent-start job for ``session_id`` on the ready list and wakes workers.

    A session already enqueued within ``idempotency_ttl`` seconds is not enqueued again: the
    result carries the first job's task id and ``duplicate=True``.
    """
    payload = payload_bytes(session_id, user_id)
    _validate_queue(queue)
    script = r.register_script(ENQUEUE_LUA)
    # The same KEYS and ARGV as Producer::enqueue_many in jobs/src/producer.rs.
    reply = script(
        keys=[f"{queue}:data", f"{queue}:active"],
        args=[
            f"{queue}:meta",
            f"{queue}:idempotency",
            _ttl_seconds(idempotency_ttl),
            MAX_ATTEMPTS,
            f"{queue}:wake",
            new_task_id(),
            payload,
            f"session:{session_id}",
        ],
    )
    if not isinstance(reply, list) or len(reply) != 2:
        raise RuntimeError(f"enqueue script returned an unexpected reply: {reply!r}")
    return Enqueued(task_id=_text(reply[1]), duplicate=int(reply[0]) == 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Produce agent-start jobs for agent-worker.")
    commands = parser.add_subparsers(dest="command", required=True)
    enqueue = commands.add_parser(
        "enqueue",
        help="write the session config (when a voice, opening line or prompt is given), "
        "enqueue the job and print its task id",
    )
    enqueue.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    )
    enqueue.add_argument("--queue", default=DEFAULT_QUEUE)
    enqueue.add_argument("--session-id", required=True)
    enqueue.add_argument("--user-id")
    enqueue.add_argument("--voice-id")
    enqueue.add_argument("--opening-line")
    enqueue.add_argument("--system-prompt")
    enqueue.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="session TTL in seconds")
    args = parser.parse_args(argv)

    try:
        # Validate everything before writing anything.
        validate_session_id(args.session_id)
        validate_user_id(args.user_id)
        _validate_queue(args.queue)
    except ValueError as e:
        print(f"agent_jobs: {e}", file=sys.stderr)
        return 2
    r = redis.Redis.from_url(args.redis_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        if any(v is not None for v in (args.voice_id, args.opening_line, args.system_prompt)):
            write_session_config(
                r,
                args.session_id,
                args.voice_id if args.voice_id is not None else DEFAULT_VOICE,
                args.user_id or "",
                args.opening_line,
                args.system_prompt,
                ttl=args.ttl,
            )
        job = enqueue_agent_start(
            r, args.session_id, args.user_id, queue=args.queue, idempotency_ttl=args.ttl
        )
    except ValueError as e:
        print(f"agent_jobs: {e}", file=sys.stderr)
        return 2
    except redis.RedisError as e:
        print(f"agent_jobs: Redis at {_redacted(args.redis_url)}: {e}", file=sys.stderr)
        return 1
    if job.duplicate:
        print(f"agent_jobs: session {args.session_id} already enqueued", file=sys.stderr)
    print(job.task_id)
    return 0


def _redacted(url: str) -> str:
    # Never print a password from the URL.
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


if __name__ == "__main__":
    sys.exit(main())
