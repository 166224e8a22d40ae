"""The one implementation of every client operation, shared by the sync and async clients.

Each operation is a generator that yields what it needs from Redis (a script call, a command,
a pipeline) and receives the reply, without doing any I/O itself ("sans-I/O"). ``Client``
drives these generators with blocking calls, ``AsyncClient`` with awaited ones; validation,
keys, arguments, reply parsing and the readiness protocol exist once, here. The Lua scripts
are the repository's ``jobs/lua/*.lua``, the ones the Rust side runs (see :mod:`._scripts`),
so the records written are the Rust producer's, byte for byte.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, Union

from . import _trace_context as tc
from . import keys as k
from .records import (
    COMPLETED,
    ERROR,
    READY,
    STOPPED,
    SWEPT,
    TERMINATED,
    DeadJob,
    Enqueued,
    Session,
    SessionEvent,
    SessionFailed,
    WaitTimeout,
    pairs,
    text,
)

CONTRACT_VERSION = 2
"""The agent-start wire contract implemented (jobs/README.md): version 2 adds the payload's
optional ``traceparent``, ``tracestate`` and ``start_by``."""
DEFAULT_START_WITHIN = 60.0
"""The clients' default deadline, seconds: a start not claimed by a worker within a minute of
its enqueue is not made (the caller has given up); ``start_within=None`` means no deadline."""
MAX_START_BY = 1 << 53
"""Largest ``start_by`` accepted (unix ms): the largest integer every JSON parser reads exactly."""
EVENT_FORMAT_VERSION = 1
"""The session event format understood (jobs/README.md, "Session events")."""
DEFAULT_TTL = 14400
"""Session TTL, seconds: lifetime of the config hash and of enqueue deduplication (4 h)."""
DEFAULT_VOICE = "Ashley"
"""The worker's default voice (what the CLI writes when only other options are given)."""
MAX_ATTEMPTS = 1
"""max_attempts in each job's meta: the worker retries in-process and never hands a job back."""
MAX_USER_ID_BYTES = 256
"""Longest accepted user id, in UTF-8 bytes."""
RETRY_CHUNK = 1000
"""Task ids per retry_dead script call (bounds one Redis command)."""


@dataclass(frozen=True)
class Eval:
    """Run the Lua script ``script`` (a file name in ``jobs/lua/``, see :mod:`._scripts`)."""

    script: str
    keys: list[str]
    args: list[Any]


@dataclass(frozen=True)
class Command:
    """Run one Redis command."""

    args: tuple[Any, ...]


@dataclass(frozen=True)
class Pipeline:
    """Run commands in one round trip (not a transaction); the reply is a list."""

    commands: list[tuple[Any, ...]]


Op = Union[Eval, Command, Pipeline]
T = TypeVar("T")
Steps = Generator[Op, Any, T]
"""An operation: yields what it needs from Redis, receives each reply, returns a ``T``."""
Operation = Steps[Any]


def _utf8(name: str, value: str) -> bytes:
    # Python strings may hold lone surrogates, which have no UTF-8 form (and no Rust String).
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text: {e.reason}") from None


def validate_user_id(user_id: object) -> str | None:
    """Returns ``user_id`` if it is None or a string of at most 256 UTF-8 bytes."""
    if user_id is None:
        return None
    if not isinstance(user_id, str):
        raise ValueError(f"user_id must be a string or None, got {type(user_id).__name__}")
    size = len(_utf8("user_id", user_id))
    if size > MAX_USER_ID_BYTES:
        raise ValueError(f"user_id is {size} bytes long; at most {MAX_USER_ID_BYTES} are allowed")
    return user_id


def _ttl_seconds(ttl: float) -> int:
    # Like the Rust crate: whole seconds, at least one.
    return max(1, int(ttl))


def validate_start_by(start_by: object) -> int | None:
    """Returns ``start_by`` if it is None or whole unix milliseconds in ``0..=2**53``."""
    if start_by is None:
        return None
    if isinstance(start_by, bool) or not isinstance(start_by, int):
        raise ValueError(f"start_by must be unix milliseconds (an int), got {type(start_by).__name__}")
    if not 0 <= start_by <= MAX_START_BY:
        raise ValueError(f"start_by {start_by} is outside 0..2**53")
    return start_by


def validate_start_within(start_within: object) -> float | None:
    """Returns ``start_within`` (seconds) if it is None or a number of at least 0."""
    if start_within is None:
        return None
    if isinstance(start_within, bool) or not isinstance(start_within, (int, float)):
        raise ValueError(f"start_within must be seconds (a number) or None, got {type(start_within).__name__}")
    if not 0 <= start_within < 10**9:
        raise ValueError(f"start_within must be 0 or more seconds, got {start_within}")
    return float(start_within)


@dataclass(frozen=True)
class StartOptions:
    """What a job carries besides its session and user (contract version 2), validated."""

    traceparent: str | None = None
    tracestate: str | None = None
    start_by: int | None = None
    start_within: float | None = None

    @staticmethod
    def of(
        traceparent: str | None,
        tracestate: str | None,
        start_by: int | None,
        start_within: float | None,
        inject: bool = True,
    ) -> StartOptions:
        """Validated options; without an explicit ``traceparent``, the current OpenTelemetry
        context (when ``inject`` and ``opentelemetry`` is importable)."""
        if traceparent is None and tracestate is None and inject:
            traceparent, tracestate = tc.current()
        if traceparent is not None:
            tc.validate_traceparent(traceparent)
        if tracestate is not None:
            if traceparent is None:
                raise ValueError("tracestate needs a traceparent")
            tc.validate_tracestate(tracestate)
        return StartOptions(
            traceparent,
            tracestate,
            validate_start_by(start_by),
            None if start_by is not None else validate_start_within(start_within),
        )


NO_OPTIONS = StartOptions()


def payload_bytes(
    session_id: str,
    user_id: str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
    start_by: int | None = None,
) -> bytes:
    """The canonical wire bytes of a job, equal to Rust's ``AgentStart::to_wire()``.

    Compact JSON, ``session_id`` first, then ``user_id``, ``traceparent``, ``tracestate``,
    ``start_by``, each omitted when None, non-ASCII as UTF-8. ``json.dumps`` escapes exactly
    what serde_json escapes: ``"``, ``\\``, ``\\b``, ``\\f``, ``\\n``, ``\\r``, ``\\t`` by
    name, other control characters as lowercase ``\\u00xx``.
    """
    job: dict[str, object] = {"session_id": k.validate_session_id(session_id)}
    if validate_user_id(user_id) is not None:
        job["user_id"] = user_id
    if traceparent is not None:
        job["traceparent"] = tc.validate_traceparent(traceparent)
    if tracestate is not None:
        job["tracestate"] = tc.validate_tracestate(tracestate)
    if validate_start_by(start_by) is not None:
        job["start_by"] = start_by
    return json.dumps(job, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_task_id() -> str:
    """A ULID: 48-bit unix milliseconds + 80 random bits, 26 Crockford base32 characters."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def write_session_config(
    session_id: str,
    voice_id: str,
    user_name: str,
    opening_line: str | None,
    system_prompt: str | None,
    ttl: float,
) -> Steps[None]:
    """Replaces ``session:<id>:config`` with its TTL, atomically (``write_session_config.lua``).

    Fields: ``voiceId``, ``userName``, ``updatedAt`` (unix seconds), then ``openingLine`` and
    ``systemPrompt`` when given.
    """
    session_keys = k.SessionKeys.of(session_id)
    fields = {"voiceId": voice_id, "userName": user_name, "updatedAt": str(int(time.time()))}
    if opening_line is not None:
        fields["openingLine"] = opening_line
    if system_prompt is not None:
        fields["systemPrompt"] = system_prompt
    args: list[Any] = [_ttl_seconds(ttl)]
    for name, value in fields.items():
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__}")
        args += [name.encode(), _utf8(name, value)]
    yield Eval("write_session_config.lua", [session_keys.config], args)


Job = Union[str, tuple[str, Union[str, None]]]
"""One job of a bulk enqueue: a session id, or a ``(session id, user id)`` pair."""


def enqueue(
    jobs: Iterable[Job],
    queue: str,
    idempotency_ttl: float,
    options: StartOptions = NO_OPTIONS,
) -> Steps[list[Enqueued]]:
    """Enqueues agent-start jobs (session ids or ``(session id, user id)`` pairs) in one atomic
    call (``enqueue.lua``, the KEYS and ARGV of ``Producer::enqueue_many``), each with
    ``options``. Everything is validated before anything is written. A relative deadline
    (``options.start_within``) costs one ``TIME`` first: ``start_by`` is on Redis's clock, as
    the worker's comparison is. Returns one :class:`Enqueued` per job, in order."""
    queue_keys = k.QueueKeys.of(queue)
    with_users = [(job, None) if isinstance(job, str) else (job[0], job[1]) for job in jobs]
    for session_id, user_id in with_users:
        payload_bytes(session_id, user_id)  # validates before anything is sent
    if not with_users:
        return []
    start_by = options.start_by
    if start_by is None and options.start_within is not None:
        seconds, micros = (yield Command(("TIME",)))
        start_by = int(seconds) * 1000 + int(micros) // 1000 + int(options.start_within * 1000)
    job_keys: list[str] = []
    triples: list[Any] = []
    for session_id, user_id in with_users:
        task_id, idempotency = new_task_id(), k.idempotency_key(session_id)
        job_keys += [queue_keys.meta(task_id), queue_keys.idempotency(idempotency)]
        payload = payload_bytes(session_id, user_id, options.traceparent, options.tracestate, start_by)
        triples += [task_id, payload, idempotency]
    reply = yield Eval(
        "enqueue.lua",
        [queue_keys.data, queue_keys.active, *job_keys],
        [_ttl_seconds(idempotency_ttl), MAX_ATTEMPTS, queue_keys.wake_channel, *triples],
    )
    return [
        Enqueued(task_id=text(task), duplicate=int(flag) == 0)
        for flag, task in zip(reply[::2], reply[1::2])
    ]


def session(session_id: str) -> Steps[Session | None]:
    """The record ``session:<id>``, or None when there is none."""
    reply = yield Command(("HGETALL", k.SessionKeys.of(session_id).state))
    fields = pairs(reply)
    return Session.from_fields(session_id, fields) if fields else None


def end_session(session_id: str) -> Steps[int]:
    """Deletes the session's documented keys and set entries atomically
    (``delete_session.lua``); returns how many were removed (0 when already ended)."""
    session_keys = k.SessionKeys.of(session_id)
    reply = yield Eval(
        "delete_session.lua",
        [*session_keys.all(), k.SESSIONS_STARTING, k.SESSIONS_READY],
        [session_id],
    )
    return int(reply)


def _error_of(result: str) -> str:
    # A stored result is {"Err":"AbortError: ..."}; anything else is shown as it is.
    try:
        err = json.loads(result).get("Err")
    except (ValueError, AttributeError):
        return result
    if not isinstance(err, str):
        return result
    return err.removeprefix("AbortError: ")


def _session_of(payload: object) -> str | None:
    try:
        session_id = json.loads(text(payload)).get("session_id")
        return k.validate_session_id(session_id)
    except (ValueError, AttributeError):
        return None


def dead_jobs(queue: str, limit: int) -> Steps[list[DeadJob]]:
    """The most recent ``limit`` dead jobs, newest first (``agent-worker dead list``)."""
    queue_keys = k.QueueKeys.of(queue)
    # The dead set is bounded by the worker's retention (retention.dead_max).
    ids = [text(i) for i in (yield Command(("SMEMBERS", queue_keys.dead)))]
    if not ids:
        return []
    commands: list[tuple[Any, ...]] = []
    for task_id in ids:
        commands.append(("HMGET", queue_keys.meta(task_id), "result", "done_at"))
        commands.append(("HGET", queue_keys.data, task_id))
    replies = yield Pipeline(commands)
    jobs = []
    for task_id, meta, payload in zip(ids, replies[::2], replies[1::2]):
        result, done_at = (None if v is None else text(v) for v in meta)
        failed_at = int(done_at) if done_at is not None and done_at.isdigit() else None
        jobs.append(
            DeadJob(
                task_id=task_id,
                session_id=_session_of(payload) if payload is not None else None,
                error=_error_of(result) if result is not None else "",
                failed_at=failed_at,
            )
        )
    jobs.sort(key=lambda job: job.failed_at or 0, reverse=True)
    return jobs[:limit]


def retry_dead(queue: str, task_ids: Iterable[str] | None) -> Steps[list[str]]:
    """Puts dead jobs back on the ready list as new (``retry_dead.lua``, as ``agent-worker
    dead retry``); None means every dead job. Returns the ids re-queued."""
    queue_keys = k.QueueKeys.of(queue)
    if task_ids is None:
        ids = [text(i) for i in (yield Command(("SMEMBERS", queue_keys.dead)))]
    else:
        ids = [str(i) for i in task_ids]
    requeued: list[str] = []
    for first in range(0, len(ids), RETRY_CHUNK):
        chunk = ids[first : first + RETRY_CHUNK]
        reply = yield Eval(
            "retry_dead.lua",
            [
                queue_keys.dead,
                queue_keys.dead_at,
                queue_keys.active,
                queue_keys.data,
                *(queue_keys.meta(i) for i in chunk),
            ],
            [queue_keys.wake_channel, *chunk],
        )
        requeued += [text(i) for i in reply]
    return requeued


# --- waiting for readiness -------------------------------------------------------------------


END_EVENTS = frozenset({ERROR, COMPLETED, TERMINATED, STOPPED, SWEPT})
"""Event statuses that end a wait with :class:`SessionFailed`."""


def judge(session_id: str, record: Session | None) -> Session | None:
    """The record if it says ready; None while the session may still become ready (no record
    yet, or ``starting``); raises :class:`SessionFailed` for any other status (``error``,
    ``completed``, ``terminated``, or one this package does not know, which the worker also
    treats as ended)."""
    if record is None or record.status is None or record.status == "starting":
        return None
    if record.status == READY:
        return record
    raise SessionFailed(session_id, record.status, record.error or record.termination_reason)


def stream_entries(reply: object) -> list[tuple[object, object]]:
    """The entries of an XREAD reply on one stream (RESP2 list or RESP3 map), in order."""
    if not reply:
        return []
    streams = list(reply.values()) if isinstance(reply, dict) else [s[1] for s in reply]  # type: ignore[attr-defined]
    entries: list[tuple[object, object]] = []
    for stream in streams:
        # redis-py's RESP3 parser wraps a stream's entries in one more list.
        if stream and isinstance(stream[0], list) and isinstance(stream[0][0], (list, tuple)):
            stream = stream[0]
        entries += [(entry[0], entry[1]) for entry in stream]
    return entries


def last_event_id() -> Steps[str]:
    """The id of the newest event, or ``0-0`` for an empty stream: where a reader starts so
    that it sees every event appended after this call."""
    reply = yield Command(("XREVRANGE", k.EVENTS, "+", "-", "COUNT", 1))
    return text(reply[0][0]) if reply else "0-0"


def wait_start(session_id: str) -> Steps[tuple[str, Session | None]]:
    """The first two steps of a wait: the stream position, THEN the record. Returns
    ``(position, ready record or None)``; raises :class:`SessionFailed` when it has ended.

    The order is what makes the wait race-free: any change after the record was read is
    appended after ``position``, so reading the stream from ``position`` cannot miss it, and
    changes before it are already in the record."""
    state = k.SessionKeys.of(session_id).state
    # One round trip: Redis runs a pipeline's commands in order, so the position is still
    # read before the record.
    newest, fields = yield Pipeline(
        [("XREVRANGE", k.EVENTS, "+", "-", "COUNT", 1), ("HGETALL", state)]
    )
    position = text(newest[0][0]) if newest else "0-0"
    fields = pairs(fields)
    record = Session.from_fields(session_id, fields) if fields else None
    return position, judge(session_id, record)


def on_event(session_id: str, event: SessionEvent) -> Steps[Session | None]:
    """What an event of the awaited session means: the record (read again) on ``ready``,
    :class:`SessionFailed` on an end, None to go on waiting (``starting``)."""
    if event.status in END_EVENTS:
        raise SessionFailed(session_id, event.status, event.reason)
    if event.status != READY:
        # `starting`, or a status of a later format version: not an end.
        return None
    # The event says ready; the record says what the worker wrote with it (the orchestrator's
    # late `status=starting` may have landed over it, which the heartbeat undoes).
    record = yield from session(session_id)
    if record is None:
        raise SessionFailed(session_id, "ended", "the record was deleted after it became ready")
    return record


def wait_ready_blocking(
    session_id: str,
    timeout: float,
    max_block_ms: int,
    after_status_read: Callable[[], None] | None = None,
) -> Steps[Session]:
    """The whole wait on one connection (the sync client): the two steps of
    :func:`wait_start`, then ``XREAD BLOCK`` from the position read before the record, until
    the session's ready or end event or ``timeout`` seconds. Each XREAD blocks for at most
    ``max_block_ms`` (below the connection's socket timeout) and goes on from the last entry
    seen: no event is skipped and nothing is polled."""
    deadline = time.monotonic() + timeout
    position, ready = yield from wait_start(session_id)
    if ready is not None:
        return ready
    if after_status_read is not None:
        after_status_read()
    while True:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            record = yield from session(session_id)
            raise WaitTimeout(session_id, timeout, record.status if record else None)
        reply = yield Command(
            ("XREAD", "COUNT", 500, "BLOCK", max(1, min(left_ms, max_block_ms)), "STREAMS", k.EVENTS, position)
        )
        for entry_id, raw in stream_entries(reply):
            position = text(entry_id)
            event = SessionEvent.parse(entry_id, raw)
            if event.session_id == session_id:
                record = yield from on_event(session_id, event)
                if record is not None:
                    return record


def block_ms_for(pool: Any) -> int:
    """The longest XREAD BLOCK that the connections of redis-py ``pool`` survive: their socket
    timeout (redis-py 6+ defaults it to 5 s) less a margin for the reply to arrive, 30 s
    without one. The margin is 20 % of the timeout, but at least half of it up to 1 s: a
    fixed 20 % of a short timeout (100 ms of 0.5 s) is less than a loaded machine or Redis
    may take to answer a BLOCK that just ended, and redis-py then fails the read."""
    kwargs = getattr(pool, "connection_kwargs", {})
    if "socket_timeout" in kwargs:
        socket_timeout = kwargs["socket_timeout"]
    else:
        # Not given: the connection class's own default, which differs between versions.
        try:
            default = inspect.signature(pool.connection_class).parameters["socket_timeout"].default
        except (AttributeError, KeyError, TypeError, ValueError):
            default = inspect.Parameter.empty
        socket_timeout = 5.0 if default is inspect.Parameter.empty else default
    if not socket_timeout:
        return 30_000
    timeout_ms = float(socket_timeout) * 1000
    margin_ms = max(timeout_ms * 0.2, min(1000.0, timeout_ms * 0.5))
    return max(10, int(timeout_ms - margin_ms))
