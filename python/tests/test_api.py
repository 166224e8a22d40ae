"""The sync and async clients are twins: the same public operations, with the same parameters,
plain in ``Client`` and ``async def`` in ``AsyncClient``. Their bodies cannot be one function
(one blocks, the other awaits), so this keeps the copies equal; both run the same steps of
``agent_worker._protocol``. Needs no Redis."""

from __future__ import annotations

import inspect
import unittest

import redis
import redis.asyncio

from agent_worker.aio import AsyncClient
from agent_worker.client import Client


def operations(cls: type, base: type) -> dict[str, inspect.Signature]:
    """The public methods ``cls`` adds to the redis-py class ``base``, by name."""
    return {
        name: inspect.signature(member)
        for name, member in vars(cls).items()
        if inspect.isfunction(member) and not name.startswith("_") and name != "aclose"
        and not hasattr(base, name)
    }


class Twins(unittest.TestCase):
    def test_the_clients_offer_the_same_operations_with_the_same_parameters(self) -> None:
        sync = operations(Client, redis.Redis)
        async_ = operations(AsyncClient, redis.asyncio.Redis)
        self.assertEqual(
            sorted(sync),
            [
                "dead_jobs",
                "end_session",
                "enqueue_agent_start",
                "enqueue_agent_starts",
                "retry_dead",
                "session",
                "wait_ready",
                "write_session_config",
            ],
        )
        self.assertEqual(sorted(sync), sorted(async_))
        for name in sync:
            with self.subTest(name):
                self.assertEqual(sync[name].parameters, async_[name].parameters)
                self.assertEqual(sync[name].return_annotation, async_[name].return_annotation)
                self.assertFalse(inspect.iscoroutinefunction(getattr(Client, name)))
                self.assertTrue(inspect.iscoroutinefunction(getattr(AsyncClient, name)))

    def test_both_clients_take_the_same_options(self) -> None:
        for cls in (Client, AsyncClient):
            with self.subTest(cls.__name__):
                client = cls.from_url("redis://127.0.0.1:1", queue="q:1", session_ttl=5)
                self.assertIsInstance(client, cls)
                self.assertEqual((client.queue, client.session_ttl), ("q:1", 5))
                client = cls(host="127.0.0.1", port=1)
                self.assertEqual((client.queue, client.session_ttl), ("agent-start", 14400))
                with self.assertRaises(ValueError):
                    cls.from_url("redis://127.0.0.1:1", queue="q*")


if __name__ == "__main__":
    unittest.main()
