"""``Client``: the blocking client, a ``redis.Redis`` with agent-worker's operations.

Every operation is implemented once in :mod:`agent_worker._protocol`; this class only runs
those steps with blocking redis-py calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import redis

from . import _protocol as p
from .keys import DEFAULT_QUEUE, validate_queue
from .records import DeadJob, Enqueued, Session


def _jobs(jobs: Iterable[str | tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    return [(job, None) if isinstance(job, str) else (job[0], job[1]) for job in jobs]


class Client(redis.Redis):
    """A ``redis.Redis`` that also speaks agent-worker's contract.

    Build it like ``redis.Redis`` (``Client.from_url("redis://...")``, ``Client(host=...)``)
    plus two options: ``queue`` (the agent-start queue, default ``agent-start``) and
    ``session_ttl`` (seconds, default 4 h: the config's TTL and the enqueue deduplication
    window). Invalid input raises ``ValueError`` before anything is written; Redis errors are
    redis-py's own exceptions.

    :meth:`wait_ready` blocks one connection of the pool for the length of the wait; for many
    concurrent waits use :class:`agent_worker.AsyncClient`, which shares one reader.
    """

    def __init__(
        self,
        *args: Any,
        queue: str = DEFAULT_QUEUE,
        session_ttl: float = p.DEFAULT_TTL,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._configure(queue, session_ttl)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        queue: str = DEFAULT_QUEUE,
        session_ttl: float = p.DEFAULT_TTL,
        **kwargs: Any,
    ) -> Client:
        """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``); other keyword
        arguments go to redis-py (e.g. ``ssl_ca_certs``)."""
        client = cast(Client, super().from_url(url, **kwargs))
        client._configure(queue, session_ttl)
        return client

    def _configure(self, queue: str, session_ttl: float) -> None:
        self.queue = validate_queue(queue)
        self.session_ttl = session_ttl
        self._agent_scripts: dict[str, Any] = {}
        # Test hook: called between the record read and the first XREAD of wait_ready.
        self._after_status_read: Callable[[], None] | None = None

    def _drive(self, operation: p.Steps[p.T]) -> p.T:
        reply: Any = None
        while True:
            try:
                op = operation.send(reply)
            except StopIteration as done:
                return cast(p.T, done.value)
            try:
                reply = self._do(op)
            except BaseException:
                operation.close()
                raise

    def _do(self, op: p.Op) -> Any:
        if isinstance(op, p.Eval):
            script = self._agent_scripts.get(op.script)
            if script is None:
                script = self._agent_scripts[op.script] = self.register_script(p.lua(op.script))
            return script(keys=op.keys, args=op.args)
        if isinstance(op, p.Command):
            return self.execute_command(*op.args)
        pipe = self.pipeline(transaction=False)
        for command in op.commands:
            pipe.execute_command(*command)
        return pipe.execute()

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

    def enqueue_agent_start(self, session_id: str, user_id: str | None = None) -> Enqueued:
        """Enqueues the agent-start job of ``session_id`` and wakes idle workers. A session
        enqueued within ``session_ttl`` is not enqueued again: ``duplicate=True`` and the
        first job's task id."""
        return self._drive(p.enqueue([(session_id, user_id)], self.queue, self.session_ttl))[0]

    def enqueue_agent_starts(
        self, jobs: Iterable[str | tuple[str, str | None]]
    ) -> list[Enqueued]:
        """The bulk form: session ids or ``(session id, user id)`` pairs, in one atomic call;
        all are validated before anything is written. One result per job, in order."""
        return self._drive(p.enqueue(_jobs(jobs), self.queue, self.session_ttl))

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
