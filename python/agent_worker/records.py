"""What the clients return and raise: the session record, session events, dead jobs, and the
errors of ``wait_ready``.

Everything here is parsed from Redis values that other processes wrote (the worker, the
orchestrator, the agent, or anything else with access), so parsing never trusts them: bytes
are decoded with replacement characters, numbers that do not parse become ``None``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Statuses of session:<id> (jobs/src/session_state.rs).
STARTING = "starting"
READY = "ready"
ERROR = "error"
COMPLETED = "completed"
TERMINATED = "terminated"
# Statuses that only events carry: the worker stopped the agent, the sweep removed the session.
STOPPED = "stopped"
SWEPT = "swept"

LIVE_STATUSES = frozenset({STARTING, READY})
"""Statuses of a session whose agent is (being) started; every other one ends a wait."""


class AgentWorkerError(Exception):
    """Base of this package's own errors (input errors are ``ValueError``)."""


class SessionFailed(AgentWorkerError):
    """The session ended instead of becoming ready: ``status`` says how, ``reason`` why."""

    def __init__(self, session_id: str, status: str, reason: str | None = None) -> None:
        self.session_id = session_id
        self.status = status
        self.reason = reason
        text = f"session {session_id} is {status}"
        super().__init__(f"{text}: {reason}" if reason else text)


class WaitTimeout(AgentWorkerError, TimeoutError):
    """The session did not become ready within the timeout (it may still)."""

    def __init__(self, session_id: str, timeout: float, status: str | None) -> None:
        self.session_id = session_id
        self.timeout = timeout
        self.status = status
        super().__init__(
            f"session {session_id} not ready after {timeout:g} s (status {status or 'none'})"
        )


def text(value: object) -> str:
    """A Redis reply value as text (replies are bytes unless ``decode_responses=True``)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def pairs(reply: object) -> dict[str, str]:
    """A hash reply (a dict, or a flat list of field, value) as ``{str: str}``."""
    if isinstance(reply, Mapping):
        return {text(k): text(v) for k, v in reply.items()}
    if isinstance(reply, Iterable) and not isinstance(reply, (str, bytes)):
        items = [text(v) for v in reply]
        return dict(zip(items[::2], items[1::2]))
    return {}


@dataclass(frozen=True)
class Session:
    """The record ``session:<id>`` (contract §3), as the worker, the orchestrator and the agent
    left it. ``fields`` holds every field as stored; the attributes are the documented ones,
    parsed (``None`` when absent or unparseable)."""

    session_id: str
    status: str | None
    worker_id: str | None
    user_id: str | None
    voice_id: str | None
    task_id: str | None
    created_at: int | None
    agent_pid: int | None
    startup_time: float | None
    last_active: int | None
    error: str | None
    last_error: str | None
    ended_at: int | None
    exit_code: int | None
    exit_signal: int | None
    stop_reason: str | None
    termination_reason: str | None
    conversation_duration_minutes: float | None
    fields: dict[str, str] = field(repr=False)

    @classmethod
    def from_fields(cls, session_id: str, fields: dict[str, str]) -> Session:
        """The record from its hash fields."""
        get = fields.get
        return cls(
            session_id=session_id,
            status=get("status"),
            worker_id=get("workerId"),
            user_id=get("userId"),
            voice_id=get("voiceId"),
            task_id=get("taskId"),
            created_at=_int(get("createdAt")),
            agent_pid=_int(get("agentPid")),
            startup_time=_float(get("startupTime")),
            last_active=_int(get("lastActive")),
            error=get("error"),
            last_error=get("lastError"),
            ended_at=_int(get("endedAt")),
            exit_code=_int(get("exitCode")),
            exit_signal=_int(get("exitSignal")),
            stop_reason=get("stopReason"),
            termination_reason=get("terminationReason"),
            conversation_duration_minutes=_float(get("conversationDurationMinutes")),
            fields=fields,
        )


@dataclass(frozen=True)
class SessionEvent:
    """One entry of the event stream ``agent-worker:events`` (format version 1)."""

    id: str
    """The stream entry id (``<ms>-<seq>``): the order of events."""
    session_id: str
    status: str
    worker_id: str
    ts_ms: int | None
    """Redis's time of the change, in milliseconds."""
    reason: str | None

    @classmethod
    def parse(cls, entry_id: object, raw: object) -> SessionEvent:
        """An event from a stream entry (id and fields as redis-py returns them)."""
        fields = pairs(raw)
        return cls(
            id=text(entry_id),
            session_id=fields.get("session_id", ""),
            status=fields.get("status", ""),
            worker_id=fields.get("worker_id", ""),
            ts_ms=_int(fields.get("ts")),
            reason=fields.get("reason"),
        )


@dataclass(frozen=True)
class Enqueued:
    """What happened to one enqueued job (the Rust crate's ``Enqueued``)."""

    task_id: str
    """The task holding the job: the new one, or the existing one for a duplicate."""
    duplicate: bool
    """True when the session was already enqueued within the TTL and nothing was written."""


@dataclass(frozen=True)
class DeadJob:
    """A job in the dead set (``agent-worker dead list``)."""

    task_id: str
    session_id: str | None
    """The session of its payload, when the payload names a valid one."""
    error: str
    """Why it failed, as the worker stored it."""
    failed_at: int | None
    """When it failed (unix seconds), when recorded."""
