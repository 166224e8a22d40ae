"""``AsyncClient``: the asyncio client, a ``redis.asyncio.Redis`` with agent-worker's operations
(the same as :class:`agent_worker.Client`, awaited), for FastAPI and other asyncio services.

Operations are those of :mod:`agent_worker._protocol`, run with awaited calls. ``wait_ready``
differs in one respect, by design: all waits of one client share ONE reader of the event
stream, which fans events out to the waiters by session id. A reader per waiter would hold a
pool connection per wait for its whole length (``XREAD BLOCK`` occupies its connection): 200
concurrent waits would need 200 connections, and a bounded pool would stall every other
command behind them. With the shared reader a wait costs two short commands (the stream
position and the record) plus one queue, whatever the number of waiters.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable
from contextlib import closing
from typing import cast

import redis.asyncio

from . import _protocol as p
from ._client_base import ClientBase
from .keys import EVENTS, validate_session_id
from .records import (
    AgentWorkerError,
    DeadJob,
    Enqueued,
    Session,
    SessionEvent,
    WaitTimeout,
    text,
)

# An idle reader (no waiters left) ends at its next wake-up: at most this long after the last
# wait, it holds its connection.
_IDLE_BLOCK_MS = 5_000
# Waits reading their start (stream position and record) at once, per client: a burst of
# waits then needs at most this many pool connections (plus the reader's), not one each.
_START_CONCURRENCY = 16


class _Waiter:
    """One wait_ready call: the events of its session, delivered by the reader."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.events: asyncio.Queue[SessionEvent | BaseException] = asyncio.Queue()


class _EventReader:
    """One reader of ``agent-worker:events`` per client, started by the first waiter and
    ended when none is left.

    Why no event can be missed: the reader's position is fixed (the stream's last id) before
    its first waiter registers, and from then on it reads the stream in order without gaps.
    A waiter registers first, then reads the stream position L and the record. Every event
    after L is appended after the registration and reaches the waiter; events up to L are
    reflected in the record, and the waiter drops them (they may be stale: an earlier
    incarnation of the session).
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._waiters: dict[str, set[_Waiter]] = {}
        self._task: asyncio.Task[None] | None = None
        self._position = "0-0"
        self._starting = asyncio.Lock()
        self.start_slots = asyncio.Semaphore(_START_CONCURRENCY)
        # Record reads after a `ready` event, by event id: one read for all its waiters.
        self._ready_reads: dict[str, asyncio.Future[Session | None]] = {}

    async def register(self, session_id: str) -> _Waiter:
        async with self._starting:
            if self._task is None or self._task.done():
                self._position = await self._client._drive(p.last_event_id())
                self._task = asyncio.create_task(self._run(), name="agent-worker-events")
        waiter = _Waiter(session_id)
        self._waiters.setdefault(session_id, set()).add(waiter)
        return waiter

    async def outcome(self, session_id: str, event: SessionEvent) -> Session | None:
        """What ``event`` means for a wait (:func:`_protocol.on_event`), shared by all the
        waiters of its session: 200 waits on one session cost one record read, not 200."""
        read = self._ready_reads.get(event.id)
        if read is None:
            read = asyncio.ensure_future(self._client._drive(p.on_event(session_id, event)))
            self._ready_reads[event.id] = read
            read.add_done_callback(lambda _: self._ready_reads.pop(event.id, None))
        # A cancelled wait must not cancel the read the others await.
        return await asyncio.shield(read)

    def unregister(self, waiter: _Waiter) -> None:
        waiters = self._waiters.get(waiter.session_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[waiter.session_id]

    async def _run(self) -> None:
        block = min(_IDLE_BLOCK_MS, p.block_ms_for(self._client.connection_pool))
        try:
            while self._waiters:
                reply = await self._client.execute_command(
                    "XREAD", "COUNT", 1000, "BLOCK", block, "STREAMS", EVENTS, self._position
                )
                for entry_id, raw in p.stream_entries(reply):
                    self._position = text(entry_id)
                    event = SessionEvent.parse(entry_id, raw)
                    for waiter in self._waiters.get(event.session_id, ()):
                        waiter.events.put_nowait(event)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            # Every current wait fails with the Redis error; the next wait starts a new reader.
            for waiters in self._waiters.values():
                for waiter in waiters:
                    waiter.events.put_nowait(error)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        # Waits still pending would otherwise hang until their timeouts.
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.events.put_nowait(AgentWorkerError("the client was closed"))


class AsyncClient(ClientBase, redis.asyncio.Redis):
    """A ``redis.asyncio.Redis`` that also speaks agent-worker's contract; the async twin of
    :class:`agent_worker.Client`, with the same methods (awaited) and options (``queue``,
    ``session_ttl``). Use one client per event loop; close it with ``await client.aclose()``.
    """

    def _configure(self, queue: str, session_ttl: float) -> None:
        super()._configure(queue, session_ttl)
        self._reader = _EventReader(self)

    async def _drive(self, operation: p.Steps[p.T]) -> p.T:
        # Client._drive, awaited: feeds each step's reply back until the operation returns.
        with closing(operation):
            try:
                op = next(operation)
                while True:
                    op = operation.send(await self._send(op))
            except StopIteration as done:
                return cast(p.T, done.value)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Ends the shared event reader, then closes the client as redis-py does."""
        await self._reader.close()
        await super().aclose(close_connection_pool)

    async def write_session_config(
        self,
        session_id: str,
        voice_id: str,
        user_name: str = "",
        *,
        opening_line: str | None = None,
        system_prompt: str | None = None,
        ttl: float | None = None,
    ) -> None:
        """See :meth:`agent_worker.Client.write_session_config`."""
        await self._drive(
            p.write_session_config(
                session_id,
                voice_id,
                user_name,
                opening_line,
                system_prompt,
                self.session_ttl if ttl is None else ttl,
            )
        )

    async def enqueue_agent_start(
        self,
        session_id: str,
        user_id: str | None = None,
        *,
        start_within: float | None = p.DEFAULT_START_WITHIN,
        start_by: int | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> Enqueued:
        """See :meth:`agent_worker.Client.enqueue_agent_start`."""
        options = p.StartOptions.of(traceparent, tracestate, start_by, start_within)
        jobs = await self._drive(
            p.enqueue([(session_id, user_id)], self.queue, self.session_ttl, options)
        )
        return jobs[0]

    async def enqueue_agent_starts(
        self,
        jobs: Iterable[p.Job],
        *,
        start_within: float | None = p.DEFAULT_START_WITHIN,
        start_by: int | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> list[Enqueued]:
        """See :meth:`agent_worker.Client.enqueue_agent_starts`."""
        options = p.StartOptions.of(traceparent, tracestate, start_by, start_within)
        return await self._drive(p.enqueue(jobs, self.queue, self.session_ttl, options))

    async def session(self, session_id: str) -> Session | None:
        """See :meth:`agent_worker.Client.session`."""
        return await self._drive(p.session(session_id))

    async def wait_ready(self, session_id: str, timeout: float = 90.0) -> Session:
        """Waits until the session's agent is ready and returns its record; raises
        :class:`~agent_worker.SessionFailed` or :class:`~agent_worker.WaitTimeout` (see
        :meth:`agent_worker.Client.wait_ready`). Any number of concurrent waits share one
        stream reader (and one connection for it)."""
        validate_session_id(session_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiter = await self._reader.register(session_id)
        try:
            async with self._reader.start_slots:
                position, ready = await self._drive(p.wait_start(session_id))
            if ready is not None:
                return ready
            if self._after_status_read is not None:
                hooked = self._after_status_read()
                if inspect.isawaitable(hooked):
                    await hooked
            while True:
                left = deadline - loop.time()
                try:
                    if left <= 0:
                        raise asyncio.TimeoutError
                    item = await asyncio.wait_for(waiter.events.get(), left)
                except asyncio.TimeoutError:
                    record = await self.session(session_id)
                    raise WaitTimeout(session_id, timeout, record.status if record else None) from None
                if isinstance(item, BaseException):
                    raise item
                if _stream_order(item.id) <= _stream_order(position):
                    continue  # already reflected in the record read after `position`
                record = await self._reader.outcome(session_id, item)
                if record is not None:
                    return record
        finally:
            self._reader.unregister(waiter)

    async def end_session(self, session_id: str) -> int:
        """See :meth:`agent_worker.Client.end_session`."""
        return await self._drive(p.end_session(session_id))

    async def dead_jobs(self, limit: int = 100) -> list[DeadJob]:
        """See :meth:`agent_worker.Client.dead_jobs`."""
        return await self._drive(p.dead_jobs(self.queue, limit))

    async def retry_dead(self, task_ids: Iterable[str] | None = None) -> list[str]:
        """See :meth:`agent_worker.Client.retry_dead`."""
        return await self._drive(p.retry_dead(self.queue, task_ids))


def _stream_order(entry_id: str) -> tuple[int, int]:
    # Stream ids compare as (milliseconds, sequence), not as text.
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (0, 0)
