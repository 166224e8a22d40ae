"""The API of the former one-file producer ``jobs/python/agent_jobs.py``, on :class:`Client`.

Its two functions take a ``redis.Redis`` first and run the package's own operations on that
client's connections; its constants and helpers are the package's. ``jobs/python/agent_jobs.py``
re-exports this module (and its command line, that of ``python -m agent_worker``), so code
written against it keeps working; new code uses :class:`agent_worker.Client` or
:class:`agent_worker.AsyncClient`, which also wait for readiness and end sessions.
"""

from __future__ import annotations

import redis

from ._protocol import (
    CONTRACT_VERSION,
    DEFAULT_TTL,
    DEFAULT_VOICE,
    MAX_ATTEMPTS,
    MAX_USER_ID_BYTES,
    new_task_id,
    payload_bytes,
    validate_user_id,
)
from .cli import main
from .client import Client
from .keys import DEFAULT_QUEUE, MAX_SESSION_ID_LEN, validate_session_id
from .records import Enqueued

__all__ = [
    "CONTRACT_VERSION",
    "DEFAULT_QUEUE",
    "DEFAULT_TTL",
    "DEFAULT_VOICE",
    "MAX_ATTEMPTS",
    "MAX_SESSION_ID_LEN",
    "MAX_USER_ID_BYTES",
    "Enqueued",
    "enqueue_agent_start",
    "main",
    "new_task_id",
    "payload_bytes",
    "validate_session_id",
    "validate_user_id",
    "write_session_config",
]


def write_session_config(
    r: redis.Redis,
    session_id: str,
    voice_id: str,
    user_name: str,
    opening_line: str | None = None,
    system_prompt: str | None = None,
    ttl: int = DEFAULT_TTL,
) -> None:
    """:meth:`Client.write_session_config` on ``r``'s connections."""
    Client(connection_pool=r.connection_pool).write_session_config(
        session_id,
        voice_id,
        user_name,
        opening_line=opening_line,
        system_prompt=system_prompt,
        ttl=ttl,
    )


def enqueue_agent_start(
    r: redis.Redis,
    session_id: str,
    user_id: str | None = None,
    queue: str = DEFAULT_QUEUE,
    idempotency_ttl: int = DEFAULT_TTL,
    *,
    start_within: float | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> Enqueued:
    """:meth:`Client.enqueue_agent_start` on ``r``'s connections. Unlike the client's, the
    default is no deadline (``start_within=None``), as this API always behaved."""
    client = Client(connection_pool=r.connection_pool, queue=queue, session_ttl=idempotency_ttl)
    return client.enqueue_agent_start(
        session_id,
        user_id,
        start_within=start_within,
        traceparent=traceparent,
        tracestate=tracestate,
    )
