"""Every Redis key name of the contract, built from validated input (the twin of
``jobs/src/keys.rs``; a test compares the two).

Session ids and queue names become part of key names, so they are validated first with the
same rules as the Rust crate: a session id is 1-128 characters of ``[A-Za-z0-9._-]`` (no
``*``, ``:``, ``{``, spaces or control characters), a queue name 1-64 characters of
``[A-Za-z0-9._:-]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_SESSION_ID_LEN = 128
"""Longest accepted session id, in characters (all accepted characters are ASCII)."""

DEFAULT_QUEUE = "agent-start"
"""The default apalis queue of agent-start jobs."""

SESSIONS_STARTING = "session:starting"
"""SET of the ids of sessions whose agent is starting."""
SESSIONS_READY = "session:ready"
"""SET of the ids of sessions whose agent is ready."""
SESSION_HEARTBEATS = "agent-worker:session-heartbeats"
"""ZSET session id -> unix seconds of its last heartbeat (the worker's; never written here)."""
EVENTS = "agent-worker:events"
"""STREAM of session state changes, appended by the worker (jobs/README.md, "Session events")."""

_SESSION_ID_CHAR = re.compile(r"[A-Za-z0-9._-]")
_QUEUE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def validate_session_id(session_id: object) -> str:
    """Returns ``session_id`` if it is 1-128 characters of ``[A-Za-z0-9._-]``.

    Raises ``ValueError`` with the messages of ``jobs/src/session_id.rs`` otherwise.
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


def validate_queue(queue: object) -> str:
    """Returns ``queue`` if it is a valid queue name (``QueueKeys::new`` in keys.rs)."""
    if not isinstance(queue, str) or not _QUEUE_NAME.fullmatch(queue):
        raise ValueError(
            f"queue name {queue!r} is invalid: use 1-64 characters of letters, digits, "
            "'.', '_', '-' and ':'"
        )
    return queue


@dataclass(frozen=True)
class SessionKeys:
    """Key names of one session; build with :meth:`of`, which validates the id."""

    session_id: str

    @classmethod
    def of(cls, session_id: str) -> SessionKeys:
        """The keys of ``session_id`` (``ValueError`` if the id is invalid)."""
        return cls(validate_session_id(session_id))

    @property
    def state(self) -> str:
        """HASH ``session:<id>``: the session's record."""
        return f"session:{self.session_id}"

    @property
    def config(self) -> str:
        """HASH ``session:<id>:config``: written by the orchestrator."""
        return f"session:{self.session_id}:config"

    @property
    def agent_pid(self) -> str:
        """STRING ``agent:<id>:pid``."""
        return f"agent:{self.session_id}:pid"

    @property
    def agent_logs(self) -> str:
        """LIST ``agent:<id>:logs``: the agent's last output lines."""
        return f"agent:{self.session_id}:logs"

    @property
    def agent_health(self) -> str:
        """HASH ``agent:<id>:health``."""
        return f"agent:{self.session_id}:health"

    @property
    def agent_logfile(self) -> str:
        """STRING ``agent:<id>:logfile``."""
        return f"agent:{self.session_id}:logfile"

    def all(self) -> list[str]:
        """Every key the session's record is made of, in the order of ``SessionKeys::all``."""
        return [
            self.state,
            self.config,
            self.agent_pid,
            self.agent_logs,
            self.agent_health,
            self.agent_logfile,
        ]


@dataclass(frozen=True)
class QueueKeys:
    """Key names of one apalis-redis queue; build with :meth:`of`, which validates the name."""

    queue: str

    @classmethod
    def of(cls, queue: str = DEFAULT_QUEUE) -> QueueKeys:
        """The keys of ``queue`` (``ValueError`` if the name is invalid)."""
        return cls(validate_queue(queue))

    @property
    def data(self) -> str:
        """HASH task id -> payload."""
        return f"{self.queue}:data"

    @property
    def meta_prefix(self) -> str:
        """Prefix of the per-task meta hashes."""
        return f"{self.queue}:meta"

    def meta(self, task_id: str) -> str:
        """HASH of one task's metadata."""
        return f"{self.queue}:meta:{task_id}"

    @property
    def active(self) -> str:
        """LIST of ready task ids."""
        return f"{self.queue}:active"

    @property
    def dead(self) -> str:
        """SET of task ids that failed for good."""
        return f"{self.queue}:dead"

    @property
    def dead_at(self) -> str:
        """ZSET task id -> finish time of dead jobs (retention)."""
        return f"{self.queue}:dead-at"

    @property
    def idempotency_prefix(self) -> str:
        """Prefix of the idempotency keys."""
        return f"{self.queue}:idempotency"

    def idempotency(self, key: str) -> str:
        """STRING: the task id holding idempotency key ``key`` (``session:<id>``)."""
        return f"{self.queue}:idempotency:{key}"

    @property
    def wake_channel(self) -> str:
        """Pub/sub channel producers publish to after pushing ready jobs."""
        return f"{self.queue}:wake"


def idempotency_key(session_id: str) -> str:
    """The idempotency key of a session's agent-start job: ``session:<id>``."""
    return f"session:{validate_session_id(session_id)}"
