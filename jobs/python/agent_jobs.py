#!/usr/bin/env python3
"""Compatibility module: the old one-file producer of agent-start jobs, now a thin layer over
the ``agent_worker`` package (``python/`` in this repository, ``pip install ./python``).

New code should use the package: ``agent_worker.Client`` / ``agent_worker.AsyncClient`` also
wait for readiness and end sessions. This module keeps the old functions, which take a
``redis.Redis`` first, and the old CLI (``python3 agent_jobs.py enqueue ...``, now that of
``python -m agent_worker``). Everything is implemented once, in the package; when it is not
installed, the copy next to this file in the repository (``../../python``) is used.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import agent_worker  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "python"))

import redis

from agent_worker import Client
from agent_worker._protocol import (  # noqa: F401  (the old module's names)
    CONTRACT_VERSION,
    DEFAULT_TTL,
    DEFAULT_VOICE,
    MAX_ATTEMPTS,
    MAX_USER_ID_BYTES,
    new_task_id,
    payload_bytes,
    validate_user_id,
)
from agent_worker.keys import DEFAULT_QUEUE, MAX_SESSION_ID_LEN, validate_session_id  # noqa: F401
from agent_worker.records import Enqueued  # noqa: F401


def write_session_config(
    r: redis.Redis,
    session_id: str,
    voice_id: str,
    user_name: str,
    opening_line: str | None = None,
    system_prompt: str | None = None,
    ttl: int = DEFAULT_TTL,
) -> None:
    """``agent_worker.Client.write_session_config`` on ``r``'s connections."""
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
) -> Enqueued:
    """``agent_worker.Client.enqueue_agent_start`` on ``r``'s connections."""
    client = Client(connection_pool=r.connection_pool, queue=queue, session_ttl=idempotency_ttl)
    return client.enqueue_agent_start(session_id, user_id)


def main(argv: list[str] | None = None) -> int:
    """The CLI of ``python -m agent_worker``."""
    from agent_worker.cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
