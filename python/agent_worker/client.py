"""``Client``: the blocking client, a ``redis.Redis`` with agent-worker's operations.

Every operation is implemented once in :mod:`agent_worker._protocol`; this class only runs
those steps with blocking redis-py calls (options and sending: :mod:`._client_base`).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import closing
from typing import cast

import redis

from . import _protocol as p
from ._client_base import ClientBase
from .records import DeadJob, Enqueued, Session


class Client(ClientBase, redis.Redis):
    """A ``redis.Redis`` that also speaks agent-worker's contract.

    Build it like ``redis.Redis`` (``Client.from_url("redis://...")``, ``Client(host=...)``)
    plus two options: ``queue`` (the agent-start queue, default ``agent-start``) and
    ``session_ttl`` (seconds, default 4 h: the config's TTL and the enqueue deduplication
    window). Invalid input raises ``ValueError`` before anything is written; Redis errors are
    redis-py's own exceptions.

    :meth:`wait_ready` blocks one connection of the pool for the length of the wait; for many
    concurrent waits use :class:`agent_worker.AsyncClient`, which shares one reader.
    """

    def _drive(self, operation: p.Steps[p.T]) -> p.T:
        # Feeds each step's reply back until the operation returns; a failed step closes it.
        with closing(operation):
            try:
                op = next(operation)
                while True:
                    op = operation.send(self._send(op))
            except StopIteration as done:
                return cast(p.T, done.value)

    def write_session_config(
        self,
        session_id: str,
        voice_id: str,
        user_name: str = "",
        *,
        opening_line: str | None = None,
        system_prompt: str | None = None,
        ttl: float | None = None,
    ) -> None:
        """Replaces ``session:<id>:config`` (``voiceId``, ``userName``, ``updatedAt``, the
        optional fields) with its TTL (default ``session_ttl``), atomically."""
        self._drive(
            p.write_session_config(
                session_id,
                voice_id,
                user_name,
                opening_line,
                system_prompt,
                self.session_ttl if ttl is None else ttl,
            )
        )

    def enqueue_agent_start(
        self,
        session_id: str,
        user_id: str | None = None,
        *,
        start_within: float | None = p.DEFAULT_START_WITHIN,
        start_by: int | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> Enqueued:
        """Enqueues the agent-start job of ``session_id`` and wakes idle workers. A session
        enqueued within ``session_ttl`` is not enqueued again: ``duplicate=True`` and the
        first job's task id.

        ``start_within`` (seconds, default 60; None: no deadline): a worker that claims the
        job later starts no agent, the session becomes ``error`` (``start_expired``) and
        :meth:`wait_ready` raises at once. The deadline is on Redis's clock (``TIME`` is read
        first); ``start_by`` (unix ms on Redis's clock) sets it absolutely instead.
        ``traceparent``/``tracestate`` (W3C) are the trace the worker continues; without them,
        the current OpenTelemetry context when ``opentelemetry`` is importable."""
        options = p.StartOptions.of(traceparent, tracestate, start_by, start_within)
        return self._drive(
            p.enqueue([(session_id, user_id)], self.queue, self.session_ttl, options)
        )[0]

    def enqueue_agent_starts(
        self,
        jobs: Iterable[p.Job],
        *,
        start_within: float | None = p.DEFAULT_START_WITHIN,
        start_by: int | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> list[Enqueued]:
        """The bulk form: session ids or ``(session id, user id)`` pairs, in one atomic call;
        all are validated before anything is written. One result per job, in order. The
        keyword options apply to every job (see :meth:`enqueue_agent_start`)."""
        options = p.StartOptions.of(traceparent, tracestate, start_by, start_within)
        return self._drive(p.enqueue(jobs, self.queue, self.session_ttl, options))

    def session(self, session_id: str) -> Session | None:
        """The session's record, or None when it has none."""
        return self._drive(p.session(session_id))

    def wait_ready(self, session_id: str, timeout: float = 90.0) -> Session:
        """Blocks until the session's agent is ready and returns its record.

        Raises :class:`~agent_worker.SessionFailed` (``status``, ``reason``) when the session
        ends instead (``error``, ``completed``, ``terminated``, ``stopped``, ``swept``) and
        :class:`~agent_worker.WaitTimeout` after ``timeout`` seconds. No polling: the stream
        position is read before the record and the event stream is read from there, so a
        change between the two reads is never missed.
        """
        return self._drive(
            p.wait_ready_blocking(
                session_id, timeout, p.block_ms_for(self.connection_pool), self._after_status_read
            )
        )

    def end_session(self, session_id: str) -> int:
        """Ends the session as the orchestrator's handler does: deletes its documented keys
        and set entries in one atomic call; the owning worker stops the agent within one
        ``session.heartbeat_interval``. Idempotent; returns how many keys and entries were
        removed (0 when nothing was left)."""
        return self._drive(p.end_session(session_id))

    def dead_jobs(self, limit: int = 100) -> list[DeadJob]:
        """The most recent ``limit`` dead jobs, newest first."""
        return self._drive(p.dead_jobs(self.queue, limit))

    def retry_dead(self, task_ids: Iterable[str] | None = None) -> list[str]:
        """Puts dead jobs (all when None) back on the ready list as new; returns the ids
        re-queued (ids not in the dead set are skipped)."""
        return self._drive(p.retry_dead(self.queue, task_ids))
