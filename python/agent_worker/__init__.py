"""agent_worker: the Python client of agent-worker, for the orchestrator.

Write a session's config, enqueue its agent-start job, wait until its agent is ready, read
its record, end it, and manage dead jobs, with records byte-identical to the Rust producer's
(``agent-jobs``)::

    import agent_worker

    client = agent_worker.Client.from_url("redis://127.0.0.1:6379")          # sync
    client = agent_worker.AsyncClient.from_url("redis://127.0.0.1:6379")     # asyncio
    client.write_session_config("abc-123", "Craig", "alice")
    client.enqueue_agent_start("abc-123", user_id="alice")  # no start after 60 s (start_within)
    record = client.wait_ready("abc-123", timeout=30)
    client.end_session("abc-123")

Importing this package is cheap: the clients (and redis-py) are imported on first use of
``Client`` or ``AsyncClient``. Docs: python/README.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it, imported when the name is first used.
_EXPORTS = {
    "Client": "client",
    "AsyncClient": "aio",
    "Session": "records",
    "SessionEvent": "records",
    "Enqueued": "records",
    "DeadJob": "records",
    "AgentWorkerError": "records",
    "SessionFailed": "records",
    "WaitTimeout": "records",
    "SessionKeys": "keys",
    "QueueKeys": "keys",
    "validate_session_id": "keys",
    "payload_bytes": "_protocol",
    "new_task_id": "_protocol",
    "DEFAULT_START_WITHIN": "_protocol",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ._protocol import DEFAULT_START_WITHIN, new_task_id, payload_bytes
    from .aio import AsyncClient
    from .client import Client
    from .keys import QueueKeys, SessionKeys, validate_session_id
    from .records import (
        AgentWorkerError,
        DeadJob,
        Enqueued,
        Session,
        SessionEvent,
        SessionFailed,
        WaitTimeout,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
