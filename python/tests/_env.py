"""What the Rust harness (tests/python_client.rs) tells the Python tests, and shared helpers."""

from __future__ import annotations

import json
import os
import time
import unittest
import uuid
from collections.abc import Callable
from typing import TypeVar

import redis

import agent_worker
from agent_worker.keys import SessionKeys

T = TypeVar("T")

REDIS_URL = os.environ["AGENT_WORKER_TEST_REDIS_URL"]
"""The test's own redis-server."""
QUEUE = os.environ.get("AGENT_WORKER_TEST_QUEUE", "agent-start")
"""The queue the harness's worker takes jobs from."""
PREFIX = os.environ.get("AGENT_WORKER_TEST_PREFIX", "py")
"""Prefix of this run's session ids."""


def new_id(name: str) -> str:
    """A session id of this run, unique: ``<PREFIX>-<name>-<8 hex digits>``."""
    return f"{PREFIX}-{name}-{uuid.uuid4().hex[:8]}"


class ClientTest(unittest.TestCase):
    """A test with ``self.client`` (a sync client on QUEUE) and ``self.raw`` (plain redis-py)."""

    def setUp(self) -> None:
        self.client = agent_worker.Client.from_url(REDIS_URL, queue=QUEUE)
        self.raw = redis.Redis.from_url(REDIS_URL)

    def tearDown(self) -> None:
        self.client.close()
        self.raw.close()


def wait_for(what: str, deadline: float, check: Callable[[], T | None]) -> T:
    """Calls ``check`` every 20 ms until it returns something, or fails after ``deadline`` s."""
    until = time.monotonic() + deadline
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > until:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        time.sleep(0.02)


def received(r: redis.Redis, session_id: str) -> dict | None:
    """What the test agent of the session reported receiving (its first log line)."""
    for text in log_lines(r, session_id):
        if text.startswith("test-agent received "):
            return json.loads(text.removeprefix("test-agent received "))
    return None


def log_lines(r: redis.Redis, session_id: str) -> list[str]:
    """The agent's shipped output lines."""
    return [line.decode() for line in r.lrange(SessionKeys.of(session_id).agent_logs, 0, -1)]
