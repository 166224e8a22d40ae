"""end_session (sync and async) against a worker in another process: the agent stops, no key
is left behind, and a second call changes nothing. Also the CLI (python -m agent_worker), its
exit codes among it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import unittest

import redis

import agent_worker
from agent_worker.keys import (
    EVENTS,
    SESSION_HEARTBEATS,
    SESSIONS_READY,
    SESSIONS_STARTING,
    QueueKeys,
    idempotency_key,
)

from ._env import QUEUE, REDIS_URL, ClientTest, new_id, wait_for


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def keys_naming(r: redis.Redis, session_id: str) -> list[str]:
    """Every key whose name contains the session id (a test Redis: small, SCAN is fine)."""
    return sorted(k.decode() for k in r.scan_iter(match=f"*{session_id}*", count=1000))


def idempotency(session_id: str) -> str:
    """The session's idempotency key on the harness's queue, which an end leaves in place."""
    return QueueKeys.of(QUEUE).idempotency(idempotency_key(session_id))


def check_ended(
    test: unittest.TestCase,
    raw: redis.Redis,
    sid: str,
    record: agent_worker.Session,
    position: bytes,
    removed: int,
) -> None:
    """What the first end_session of a ready session must have done: removed its keys and set
    entries, and made the owning worker (another process) stop the agent and drop its index
    entry. ``position`` is the event stream's last id before the end."""
    # The record, config, pid, logs, health (no logfile: agent.log_dir is unset) and the
    # entry in session:ready.
    test.assertEqual(removed, 6)
    pid = record.agent_pid
    assert pid is not None

    # The owning worker notices within a heartbeat and stops the agent.
    def stopped() -> dict | None:
        for _, entries in raw.xread({EVENTS: position}, block=200) or []:
            for _, fields in entries:
                event = {k.decode(): v.decode() for k, v in fields.items()}
                if event["session_id"] == sid:
                    return event
        return None

    event = wait_for("the worker's stop event", 20, stopped)
    test.assertEqual((event["status"], event.get("reason")), ("stopped", "session_ended"))
    test.assertEqual(event["worker_id"], record.worker_id)
    wait_for("the agent to exit", 20, lambda: True if not alive(pid) else None)

    # Nothing of the session is left but the queue's idempotency key, which keeps the same
    # session id from starting again within the TTL (jobs/README.md).
    wait_for(
        "the session's keys to be gone",
        20,
        lambda: True if keys_naming(raw, sid) == [idempotency(sid)] else None,
    )
    test.assertFalse(raw.sismember(SESSIONS_STARTING, sid))
    test.assertFalse(raw.sismember(SESSIONS_READY, sid))
    wait_for(
        "the worker to drop its index entry",
        20,
        lambda: True if raw.zscore(SESSION_HEARTBEATS, sid) is None else None,
    )


class EndSession(ClientTest):
    def test_end_session_stops_the_agent_and_leaves_no_key_behind(self) -> None:
        sid = new_id("end")
        self.client.write_session_config(sid, "Craig", "alice", opening_line="Hello")
        self.client.enqueue_agent_start(sid, user_id="alice")
        record = self.client.wait_ready(sid, timeout=30)
        self.assertTrue(record.agent_pid is not None and alive(record.agent_pid), "the agent runs")
        position = self.raw.xrevrange(EVENTS, count=1)[0][0]

        removed = self.client.end_session(sid)
        self.assertIsNone(self.client.session(sid))
        check_ended(self, self.raw, sid, record, position, removed)
        # Idempotent.
        self.assertEqual(self.client.end_session(sid), 0)
        self.assertEqual(keys_naming(self.raw, sid), [idempotency(sid)])

    def test_the_cli_enqueues_waits_shows_and_ends(self) -> None:
        sid = new_id("cli")
        env = dict(os.environ, REDIS_URL=REDIS_URL)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "agent_worker", *args, "--queue", QUEUE, "--session-id", sid],
                env=env, capture_output=True, text=True, timeout=60,
            )

        enqueued = cli("enqueue", "--voice-id", "Olivia", "--user-id", "carol")
        self.assertEqual(enqueued.returncode, 0, enqueued.stderr)
        self.assertEqual(len(enqueued.stdout.strip()), 26, "a ULID task id")
        waited = cli("wait", "--timeout", "30")
        self.assertEqual(waited.returncode, 0, waited.stderr)
        self.assertEqual(json.loads(waited.stdout)["status"], "ready")
        shown = cli("status")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertEqual(json.loads(shown.stdout)["voice_id"], "Olivia")
        ended = cli("end")
        self.assertEqual((ended.returncode, ended.stdout.strip()), (0, "6"), ended.stderr)
        self.assertEqual(cli("status").returncode, 1)
        bad = subprocess.run(
            [sys.executable, "-m", "agent_worker", "end", "--session-id", "a:b"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(bad.returncode, 2)
        self.assertIn("':'", bad.stderr)

    def test_the_cli_wait_exits_3_when_it_times_out(self) -> None:
        # A session nobody enqueued: it never becomes ready (nor fails).
        sid = new_id("cli-never")
        started = time.monotonic()
        waited = subprocess.run(
            [sys.executable, "-m", "agent_worker", "wait", "--redis-url", REDIS_URL,
             "--queue", QUEUE, "--session-id", sid, "--timeout", "0.5"],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(waited.returncode, 3, waited.stderr)
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertEqual(waited.stdout, "", "no record printed")
        self.assertIn(f"session {sid} not ready after 0.5 s (status none)", waited.stderr)


class AsyncEndSession(unittest.IsolatedAsyncioTestCase):
    async def test_end_session_stops_the_agent_and_leaves_no_key_behind(self) -> None:
        client = agent_worker.AsyncClient.from_url(REDIS_URL, queue=QUEUE)
        raw = redis.Redis.from_url(REDIS_URL)
        try:
            sid = new_id("aend")
            await client.write_session_config(sid, "Olivia", "bob", opening_line="Hi there")
            await client.enqueue_agent_start(sid, user_id="bob")
            record = await client.wait_ready(sid, timeout=30)
            self.assertEqual(record.voice_id, "Olivia")
            self.assertTrue(record.agent_pid is not None and alive(record.agent_pid))
            position = raw.xrevrange(EVENTS, count=1)[0][0]

            removed = await client.end_session(sid)
            self.assertIsNone(await client.session(sid))
            # The checks block (they wait on the worker): off the event loop.
            await asyncio.to_thread(check_ended, self, raw, sid, record, position, removed)
            # Idempotent.
            self.assertEqual(await client.end_session(sid), 0)
            self.assertEqual(keys_naming(raw, sid), [idempotency(sid)])
        finally:
            await client.aclose()
            raw.close()


if __name__ == "__main__":
    unittest.main()
