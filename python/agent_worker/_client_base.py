"""``ClientBase``: what :class:`~agent_worker.Client` and :class:`~agent_worker.AsyncClient`
share besides the operations of :mod:`._protocol`: their options and how one step of an
operation is sent to Redis.

It is a mixin placed before the redis-py class in each client's bases, so one ``__init__``,
``from_url`` and ``_send`` serve both: redis-py's sync and asyncio classes have the same
methods, which return the reply (``redis.Redis``) or an awaitable of it
(``redis.asyncio.Redis``). What must differ, the loop that feeds the replies back
(``_drive``, blocking or awaited) and the public methods (plain or ``async def``, typed),
stays in each client; ``python/tests/test_api.py`` keeps the two method sets equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from . import _protocol as p
from ._scripts import lua
from .keys import DEFAULT_QUEUE, validate_queue

C = TypeVar("C", bound="ClientBase")


class ClientBase:
    """The options (``queue``, ``session_ttl``) and the Redis side of a step."""

    queue: str
    """The agent-start queue (the worker's ``redis.queue``), validated."""
    session_ttl: float
    """Seconds: the config's TTL and the enqueue deduplication window (``session.ttl``)."""

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
        cls: type[C],
        url: str,
        *,
        queue: str = DEFAULT_QUEUE,
        session_ttl: float = p.DEFAULT_TTL,
        **kwargs: Any,
    ) -> C:
        """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``); other keyword
        arguments go to redis-py (e.g. ``ssl_ca_certs``)."""
        client: C = super().from_url(url, **kwargs)  # type: ignore[misc]
        client._configure(queue, session_ttl)
        return client

    def _configure(self, queue: str, session_ttl: float) -> None:
        self.queue = validate_queue(queue)
        self.session_ttl = session_ttl
        self._agent_scripts: dict[str, Any] = {}
        # Test hook: called between the record read and the first event a wait reads (an
        # awaitable it returns is awaited by AsyncClient).
        self._after_status_read: Callable[[], Any] | None = None

    def _send(self, op: p.Op) -> Any:
        """Sends ``op``: returns its reply, or (asyncio) an awaitable of it."""
        redis: Any = self
        if isinstance(op, p.Eval):
            script = self._agent_scripts.get(op.script)
            if script is None:
                script = self._agent_scripts[op.script] = redis.register_script(lua(op.script))
            return script(keys=op.keys, args=op.args)
        if isinstance(op, p.Command):
            return redis.execute_command(*op.args)
        pipe = redis.pipeline(transaction=False)
        for command in op.commands:
            pipe.execute_command(*command)
        return pipe.execute()
